"""Raw sources: readers that yield raw examples `{"image", "caption", "label"?, "key"}` (no preprocessing).

The embedded dataset (scenes, embedded), TFDS by name, WebDataset tar shards and their ArrayRecord
conversion, caption files and class folders, DOCCI, split slicing, and captions made from class labels.
"""
