"""The data pipeline: parquet rows -> typed ``Batch``es.

``files`` checks every file's footer against the layout up front and lists its row groups,
then splits them into training and validation; ``stream.PCVRDataset`` streams the row groups of
its shard, converts each Arrow record batch with ``convert.BatchConverter`` (ragged columns and
event order from ``events``, inner loops from ``kernels``) and, when training, shuffles rows
through a pool; ``loaders`` builds the DataLoaders. Importing the package changes nothing
process-wide.
"""
