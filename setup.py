"""MoNTA: network-traffic-aware Mixture-of-Experts training on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="monta",
    version="0.1.0",
    description="Network-traffic-aware Mixture-of-Experts training on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["monta", "monta.*"]),
    package_data={"monta.data": ["bundled/*"],
                  "monta.planner": ["presets/*.yaml", "presets/models/*.json"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.6",  # pinned in requirements.txt; GPU images bring their own build
        "megatron-core==0.16.1",
        "numpy",
        "sentencepiece",
        "safetensors",
        "tensorboard",
        "tqdm",
        "psutil",  # used by megatron's checkpoint saver but not declared by megatron-core
        "pyyaml",
        "matplotlib",  # tools/plot_run.py, tools/plan.py --plot, tools/bench_comm.py --plot
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "transformers"],
        # GPU extras come with NGC images (docker/); listed for completeness
        "gpu": ["transformer-engine"],
    },
    scripts=["pretrain_moe.py"],
)
