"""The import path users' scripts rely on for the prompt/response dataset (the interface contract):
`from model.dataset import LowMemParquetDataset`. The data pipeline itself is the `data_pipeline` package."""
from data_pipeline.pairs import LowMemParquetDataset  # noqa: F401 - the contract's name, where it promises it
