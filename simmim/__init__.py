"""simmim: SimMIM pretraining and fine-tuning of DeiT vision transformers."""

import os

# Inductor's cache folder as the user set it, read before anything imports torchvision, whose import makes
# torch's inductor set the variable to its own /tmp default. simmim.compilation keeps the cache with the
# run unless the user chose a folder.
INDUCTOR_CACHE_CHOSEN = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
