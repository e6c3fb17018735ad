"""The U-Net, the pipeline's scheduler and the runtime study need no open_clip_torch: only building a text tower
imports it (the GPU machine's image has no open_clip_torch unless its wheel is carried)."""

import subprocess
import sys

BLOCK_OPEN_CLIP = """
import sys

class BlockOpenClip:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "open_clip":
            raise ImportError("open_clip is blocked in this test")

sys.meta_path.insert(0, BlockOpenClip())
"""

USE_MODEL = """
import torch
from raphael_ext import OpenCLIPTextEncoder, RaphaelUNet
from raphael_ext.pipelines.pipeline_raphael import default_scheduler

unet = RaphaelUNet.from_preset("tiny").eval()
config = unet.config
scheduler = default_scheduler(unet)
x = torch.randn(1, config.in_channels, config.sample_size, config.sample_size)
text = torch.randn(1, config.text_tokens, config.cross_attention_dim)
with torch.no_grad():
    out = unet(x, torch.tensor([500]), text, torch.tensor([5]))
assert out.sample.shape == x.shape
assert "open_clip" not in sys.modules
try:
    OpenCLIPTextEncoder("tiny")
except ImportError as error:
    assert "pip install open_clip_torch" in str(error), error
else:
    raise AssertionError("building a text tower without open_clip must raise")
print("ok")
"""


def test_model_and_scheduler_work_without_open_clip():
    result = subprocess.run([sys.executable, "-P", "-c", BLOCK_OPEN_CLIP + USE_MODEL], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
