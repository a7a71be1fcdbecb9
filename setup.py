"""atpo_megatron: AT²PO (turn-level tree rollouts + the ATPO loss) on a Megatron TP/PP actor."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="atpo_megatron",
    version="0.1.0",
    description="Agentic turn-level tree RL (AT²PO) on megatron-core, with vLLM or transformers rollouts",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",  # megatron-core >= 0.17 requires it
    packages=find_packages(include=["atpo_megatron", "atpo_megatron.*"]),
    install_requires=[
        "torch>=2.13,<2.14",
        "megatron-core>=0.19.2,<0.20",
        "transformers>=5.24,<6",
        "safetensors>=0.8",
        "numpy>=2.0",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "rich>=13",
        "tensorboard>=2.21",
        "psutil>=7",  # undeclared runtime dependency of megatron's torch_dist checkpoint save
        "gguf>=0.19",  # reads the bundled SmolLM2 GGUF once into safetensors
        "accelerate>=1.10",
        "bm25s>=0.3.16",
        "fastapi>=0.115",
        "uvicorn>=0.34",
        "httpx>=0.28",
        "pyarrow>=20",  # FlashRAG parquet datasets
        "matplotlib>=3.9",  # `atpo report` plots
        "einops>=0.8",
    ],
    extras_require={
        "test": ["pytest>=8"],
        "dense": ["sentence-transformers>=5"],
        "vllm": ["vllm>=0.33,<0.34"],
        "te": ["transformer-engine[pytorch]>=2.20"],
        # `atpo submit --launcher nemo-run`. leptonai < 0.47 (0.47 broke `import nemo_run`). These pins
        # resolve older anyio/httpx/starlette/urllib3 than vLLM uses: next to vLLM install
        # requirements/nemo-run.txt with --no-deps instead (README command 1 does).
        "nemo": ["nemo-run==0.11.1", "leptonai==0.27.3", "torchx==0.7.0"],
    },
    entry_points={"console_scripts": ["atpo=atpo_megatron.cli:main"]},
)
