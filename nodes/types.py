"""The pack's custom ComfyUI socket types and its node category."""
from comfy_api.latest import io

CATEGORY = "sampling/morse"
DotModelType = io.Custom("DOT_MODEL")
ScheduleType = io.Custom("MORSE_SCHEDULE")
