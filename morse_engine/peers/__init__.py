"""The accelerators ComfyUI users run today, as schedules and fills of the engine, each in a module of its own that
names its source; the evaluation prices them on the same workload as Morse (issue 28)."""
