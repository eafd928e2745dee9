"""Sources: what to adapt on, as an ordered list of stream items, and their decoding into batches."""

from tta_cli.sources.folder import IMAGE_SUFFIXES, folder_items, natural_key
from tta_cli.sources.items import Batch, StreamItem
from tta_cli.sources.labels import LabelMap

__all__ = ["IMAGE_SUFFIXES", "Batch", "LabelMap", "StreamItem", "folder_items", "natural_key"]
