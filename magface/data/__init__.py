"""Data: RecordIO shards on Ray Data, image decoding, storage (local and S3), conversion, synthetic faces.

Names load lazily so `import magface.data` does not import Ray.
"""

_EXPORTS = {
    "read_recordio": "magface.data.datasource",
    "read_property": "magface.data.datasource",
    "BadRecords": "magface.data.datasource",
    "RecordIODatasource": "magface.data.datasource",
    "decode_images": "magface.data.transforms",
    "flip_mask": "magface.data.transforms",
    "convert_folder": "magface.data.convert",
    "split_rec": "magface.data.convert",
    "upload_shards": "magface.data.convert",
    "StorageError": "magface.data.storage",
    "check_readable": "magface.data.storage",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'magface.data' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
