"""Integrations with other tools (the top layer: it may import any library layer; nothing in the
library imports it). neurokern.integrations.mergekit: neurokern's methods inside mergekit."""
