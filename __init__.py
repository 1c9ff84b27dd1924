"""ComfyUI entry point of the Morse node pack: registers the nodes.

ComfyUI imports this file as a package. pytest or plain Python may import it too, where
ComfyUI is absent; then there is nothing to register and it must not fail. Inside ComfyUI
an import error is real and is left to propagate, so ComfyUI reports it.
"""
import importlib.util

if __package__ and importlib.util.find_spec("comfy") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
