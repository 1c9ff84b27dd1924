"""The pack's ComfyUI nodes (thin wrappers over ``morse_engine``).

Imported only inside ComfyUI, through the repository root's ``__init__.py``.
"""
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
