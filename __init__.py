"""ComfyUI entry point of the Morse node pack (V3 node API: ``comfy_entrypoint``).

ComfyUI imports this file as a package. pytest or plain Python may import it too, where
ComfyUI is absent; then there is nothing to register and it must not fail. Inside ComfyUI
an import error is real and is left to propagate, so ComfyUI reports it.
"""
import importlib.util

if __package__ and importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
else:
    __all__ = []
