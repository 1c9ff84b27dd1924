"""The embedded reference model: its UNet, the digits data, the feature classifier and their weight files."""
