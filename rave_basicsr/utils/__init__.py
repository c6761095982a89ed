"""Shared machinery: option parsing, BasicSR pipeline patches, plugin discovery, image and checkpoint I/O."""
