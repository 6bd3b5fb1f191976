"""Input readers, one module each; importing this package registers them (see ``base``)."""
from clip_curate.readers import curated, parquet_pools, url_list, webdataset  # noqa: F401 - registers
from clip_curate.readers.base import InputPlan, ReaderConfig, ReadUrlList, plan_input  # noqa: E402

__all__ = ["InputPlan", "ReaderConfig", "ReadUrlList", "plan_input"]
