"""Static checks of docker/Dockerfile (no Docker daemon needed): it parses, the base image and
every pip install are pinned, no secrets, and it runs as any uid. The checker is shown to
reject Dockerfiles that break each rule, and to accept a minimal good one."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO
from tests.docker.dockerfile_check import parse, problems

DOCKERFILE = REPO / "docker" / "Dockerfile"
GOOD = """\
# a comment
ARG BASE=nvcr.io/nvidia/pytorch:25.01-py3
FROM ${BASE}
ENV HF_HOME=/tmp/cache/hf \\
    # a comment inside a continuation
    TRITON_CACHE_DIR=/cache/triton
WORKDIR /opt/app
RUN pip install --no-cache-dir torch==2.6.0 'numpy==1.26.4' \\
 && pip install --no-deps -e .
VOLUME ["/cache"]
CMD ["python", "-c", "print(1)"]
"""


def test_dockerfile_parses():
    instructions = parse(DOCKERFILE.read_text())
    keywords = [i.keyword for i in instructions]
    assert keywords[0] == "FROM" and "WORKDIR" in keywords and keywords[-1] == "CMD"
    # the continued ENV is one instruction holding every variable
    env = " ".join(i.args for i in instructions if i.keyword == "ENV")
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in env and "TRITON_CACHE_DIR=" in env


def test_dockerfile_follows_the_rules():
    assert problems(DOCKERFILE.read_text(), context=REPO) == []


def test_image_pins_agree_with_requirements_txt():
    """docker/requirements.txt is requirements.txt minus what the NGC base brings."""
    def pins(path):
        return dict(re.match(r"([\w.-]+)==(\S+)", line).groups()
                    for line in path.read_text().splitlines()
                    if line.strip() and not line.startswith("#"))

    image, host = pins(REPO / "docker" / "requirements.txt"), pins(REPO / "requirements.txt")
    assert set(host) - set(image) == {"torch", "numpy"}
    assert all(host[name] == version for name, version in image.items()), (image, host)


def test_readme_documents_the_volumes_and_non_root_runs():
    readme = (REPO / "docker" / "README.md").read_text()
    text = DOCKERFILE.read_text()
    volumes = re.findall(r'"(/[^"]+)"', re.search(r"^VOLUME (.*)$", text, re.M).group(1))
    assert volumes and all(volume in readme for volume in volumes)
    assert "--user $(id -u):$(id -g)" in readme and "HOME=" in readme
    assert "torchrun" in readme and "--rdzv-backend c10d" in readme and ".sbatch" in readme


def test_a_good_dockerfile_passes():
    assert problems(GOOD) == []


BAD = {
    "unknown instruction": (GOOD.replace("WORKDIR", "WORKDR"), "unknown instruction"),
    "dangling continuation": (GOOD + "RUN echo \\\n", "ends inside a line continuation"),
    "no FROM first": ("RUN echo hi\n" + GOOD, "first instruction"),
    "untagged base": (GOOD.replace("pytorch:25.01-py3", "pytorch"), "explicit tag"),
    "latest base": (GOOD.replace("25.01-py3", "latest"), "explicit tag"),
    "unpinned pip": (GOOD.replace("torch==2.6.0", "torch"), "without an exact version"),
    "range pin": (GOOD.replace("'numpy==1.26.4'", "'numpy>=1.26'"), "without an exact version"),
    "unpinned pip upgrade": (GOOD.replace("&& pip install --no-deps -e .",
                                          "&& python -m pip install --upgrade pip"),
                             "'pip' without an exact version"),
    "unpinned -r file": (GOOD.replace("torch==2.6.0", "-r /opt/app/loose.txt"),
                         "loose.txt has an unpinned requirement 'torch>=2.6'"),
    "-r file outside the context": (GOOD.replace("torch==2.6.0", "-r /x/reqs.txt"),
                                    "cannot check the pins"),
    "secret ENV": (GOOD.replace("WORKDIR", "ENV HF_TOKEN=hf_abc\nWORKDIR"), "HF_TOKEN"),
    "secret ARG": (GOOD.replace("WORKDIR", "ARG WANDB_API_KEY=abc\nWORKDIR"), "WANDB_API_KEY"),
    "credentials in a URL": (GOOD.replace("CMD", "RUN curl -O https://bob:pw@example.com/x\nCMD"),
                             "URL carries credentials"),
    "token in a URL": (GOOD.replace("CMD", "RUN pip install git+https://ghp_x@github.com/a/b@"
                                           "0123456789abcdef0123456789abcdef01234567\nCMD"),
                       "URL carries credentials"),
    "chown to a uid": (GOOD.replace("CMD", "RUN chown -R 1000:1000 /opt/app\nCMD"),
                       "hard-coded uid"),
    "COPY --chown uid": (GOOD.replace("CMD", "COPY --chown=1000 . .\nCMD"), "hard-coded uid"),
    "no WORKDIR": (GOOD.replace("WORKDIR /opt/app\n", ""), "no WORKDIR"),
    "no HF_HOME": (GOOD.replace("HF_HOME=/tmp/cache/hf", "FOO=1"), "HF_HOME is not set"),
    "cache not writable": (GOOD.replace("/tmp/cache/hf", "/root/.cache/hf"),
                           "neither under /tmp nor a declared VOLUME"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_the_checker_rejects(name, tmp_path):
    text, expected = BAD[name]
    (tmp_path / "loose.txt").write_text("numpy==1.26.4\ntorch>=2.6  # a range\n")
    found = problems(text, context=tmp_path)
    assert any(expected in problem for problem in found), found
