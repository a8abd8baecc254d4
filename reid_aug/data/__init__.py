"""Re-ID datasets: Market-1501 layout readers and seeded training subsets."""

from reid_aug.data.market import (
    DatasetError,
    ImageRecord,
    ReidDataset,
    check_images_readable,
    parse_market_name,
    read_image_folder,
    read_market,
    read_msmt17,
    read_reid_dataset,
    read_synthetic_folder,
    records_summary,
)
from reid_aug.data.subset import (
    SubsetConfig,
    make_subset,
    read_subset_csv,
    read_subset_meta,
    subset_size,
    write_subset_csv,
)

__all__ = [
    "DatasetError",
    "ImageRecord",
    "ReidDataset",
    "SubsetConfig",
    "check_images_readable",
    "make_subset",
    "parse_market_name",
    "read_image_folder",
    "read_market",
    "read_msmt17",
    "read_reid_dataset",
    "read_synthetic_folder",
    "read_subset_csv",
    "read_subset_meta",
    "records_summary",
    "subset_size",
    "write_subset_csv",
]
