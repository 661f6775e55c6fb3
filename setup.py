"""pip-installable stllm_core + training for workstations without ROS (`pip install -e .`).

On ROS machines the package is built by colcon from package.xml/CMakeLists.txt instead; the version is read from
package.xml so the two never drift.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

version = re.search(r"<version>([^<]+)</version>", Path(__file__).with_name("package.xml").read_text()).group(1)

setup(
    name="stllm",
    version=version,
    description="ST-LLM spatio-temporal reasoning for robots (core library and training)",
    packages=find_packages(include=["stllm_core", "stllm_core.*", "training", "training.*"]),
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "safetensors",
        "numpy>=1.26",  # a distro's numpy 1.26 (cv_bridge is built against 1.x) or 2.x
        "scipy",
        "opencv-python-headless",
        "open3d-cpu",
        "rosbags",
        "pyyaml",
        "tqdm",
        "einops",
        "gguf",
        "accelerate",
    ],
    extras_require={
        "training": ["peft", "tensorboard", "pycocoevalcap", "matplotlib"],
        "gpu": ["torch-tensorrt", "flash-attn"],
    },
    entry_points={
        "console_scripts": [
            "stllm-reasim = stllm_core.data.cli:reasim_main",
            "stllm-clip2bag = stllm_core.data.cli:clip2bag_main",
            "stllm-rgbd2clip = stllm_core.data.cli:rgbd2clip_main",
            "stllm-train = training.train:main",
            "stllm-eval = training.evaluate:main",
            "stllm-serve = stllm_core.engine.serve:main",
        ]
    },
)
