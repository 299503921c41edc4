"""The files that run qdeep on a cluster: cluster.yaml, docker/, scripts/submit.sh, README's section.

No cloud, Docker engine or network here, so each file is checked by what can run offline: cluster.yaml
by Ray's own launcher validation, the Dockerfile by the pins it shares with the Makefile (constraints.txt)
and what it copies, submit.sh by the `ray job submit` command it builds (parsed by Ray's own CLI), the README by running
its examples through submit.sh --dry-run and qdeep's argument parser.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.unit  # no Ray

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
SUBMIT = REPO / "scripts" / "submit.sh"

def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_validate(config: dict) -> dict:
    """What `ray up` does to a config before touching a cloud: fill in the provider's defaults, then
    validate against Ray's launcher schema (ray-schema.json) and its cross-field rules. The AWS step in
    between (autodetecting instance resources) needs boto3 and credentials, and is skipped."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# ---------------------------------------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_passes_rays_validation():
    prepared = ray_validate(load_cluster())
    assert prepared["provider"]["type"] == "aws"


def _misspell_top_level(c):
    c["idle_timeout_minuts"] = c.pop("idle_timeout_minutes")


def _misspell_node_type_key(c):
    c["available_node_types"]["gpu.1x"]["min_worker"] = c["available_node_types"]["gpu.1x"].pop("min_workers")


def _fractional_gpu(c):
    c["available_node_types"]["gpu.1x"]["resources"]["GPU"] = 0.5


def _unknown_head_type(c):
    c["head_node_type"] = "head.gpu"


def _misspell_docker_key(c):
    c["docker"]["pull_befor_run"] = c["docker"].pop("pull_before_run")


@pytest.mark.parametrize("breakage", [_misspell_top_level, _misspell_node_type_key, _fractional_gpu,
                                      _unknown_head_type, _misspell_docker_key])
def test_rays_validation_rejects_a_broken_copy(breakage):
    """Proves the check above bites: each typo fails Ray's validation, as it would fail `ray up`."""
    import jsonschema

    config = load_cluster()
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(config)


def test_cluster_layout():
    c = load_cluster()
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    assert head["resources"].get("CPU", 0) > 0, "the head runs drivers and Tune: it needs CPUs"
    assert "InstanceMarketOptions" not in head["node_config"], "the head holds the drivers: no spot"

    workers = {name: t for name, t in types.items() if name != c["head_node_type"]}
    gpus = sorted(t["resources"].get("GPU", 0) for t in workers.values())
    assert gpus and gpus[0] == 1 and gpus[-1] > 1, f"want a 1-GPU and a multi-GPU worker type, got {gpus}"
    for name, t in workers.items():
        assert t["min_workers"] == 0, f"{name}: GPU nodes start from zero"
        assert 1 <= t["max_workers"] <= c["max_workers"], f"{name}: max_workers"
        assert t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", f"{name}: spot"
    assert c["idle_timeout_minutes"] > 0
    assert c["provider"]["cache_stopped_nodes"] is False, "ray down must not leave stopped nodes billing"


def _all_commands(c: dict) -> list[str]:
    keys = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"]
    return [cmd for key in keys for cmd in c.get(key) or []]


def test_cluster_commands_are_valid_bash():
    for cmd in _all_commands(load_cluster()):
        r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert r.returncode == 0, f"bash syntax error in cluster.yaml command:\n{cmd}\n{r.stderr}"


def test_head_starts_ray_and_mlflow_and_every_node_knows_where_mlflow_is():
    c = load_cluster()
    head = " ".join(c["head_start_ray_commands"])
    workers = " ".join(c["worker_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--dashboard-host=127.0.0.1" in head, "the job API is reached over SSH, never on a public port"
    assert "ray start --address=$RAY_HEAD_IP:6379" in workers

    server = re.search(r"mlflow server (.*?)(?:>|&|$)", head)
    assert server, "the head must start an MLflow tracking server"
    port = re.search(r"--port[ =](\d+)", server.group(1)).group(1)
    assert "--backend-store-uri sqlite:////home/ray/head/" in server.group(1), "runs must live on the head volume"
    assert "/home/ubuntu/qdeep-head:/home/ray/head" in " ".join(c["docker"]["head_run_options"])
    # Rank 0 logs from a GPU node: every node gets the head's private address, with the server's port.
    assert re.search(rf'MLFLOW_TRACKING_URI="http://\$\(python -c .*get_node_ip_address.*\):{port}"', head)
    assert f'MLFLOW_TRACKING_URI="http://$RAY_HEAD_IP:{port}"' in workers


def test_docker_image_is_the_one_the_readmes_build():
    image = load_cluster()["docker"]["image"]
    for readme in (REPO / "README.md", REPO / "docker" / "README.md"):
        tags = re.findall(r"docker build -f docker/Dockerfile -t (\S+) \.", readme.read_text())
        literal = {t for t in tags if not t.startswith("$")}  # $REGISTRY/... is the ECR variant
        assert literal == {image}, f"{readme.relative_to(REPO)} builds {tags}, cluster.yaml runs {image}"


# ------------------------------------------------------------------------------------------------- Dockerfile


def constraint_pins() -> dict[str, str]:
    """name -> version of constraints.txt, the one place torch, torchvision and torchcodec are pinned."""
    reqs = [Requirement(line) for line in (REPO / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    return {canonicalize_name(r.name): str(r.specifier) for r in reqs}


def _code(path: Path) -> str:
    """The file without its comment lines."""
    return "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))


def test_torch_is_pinned_in_constraints_txt_alone_and_both_installs_use_it():
    assert constraint_pins() == {"torch": "==2.14.1", "torchvision": "==0.29.1", "torchcodec": "==0.17.0"}
    makefile, dockerfile = _code(REPO / "Makefile"), _code(DOCKERFILE)
    for name, text in (("Makefile", makefile), ("docker/Dockerfile", dockerfile)):
        assert not re.search(r"torch(vision)?\s*[=<>~!]=", text), f"{name} pins torch itself: constraints.txt does"
        installs = [i for i in re.findall(r"pip install [^\n]*", text) if "--upgrade pip" not in i]
        assert installs, f"{name} installs nothing?"
        constraint = "-c constraints.txt" if name == "Makefile" else "-c /opt/qdeep/constraints.txt"
        assert all(constraint in i for i in installs), f"{name}: an install without {constraint}: {installs}"
    assert re.search(r"^\t\$\(PIP\) torch torchvision$", makefile, flags=re.MULTILINE)
    assert re.search(r"^COPY .*\bconstraints\.txt /opt/qdeep/$", dockerfile, flags=re.MULTILINE)


def test_dockerfile_takes_torch_from_its_base_images_cuda_and_the_project_with_the_gpu_extra():
    dockerfile = _code(DOCKERFILE)
    cuda = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)[.\d]*-(?:cudnn-)?runtime-ubuntu", dockerfile,
                     flags=re.MULTILINE)
    index = re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cu(\d+)$", dockerfile, flags=re.MULTILINE)
    assert cuda and index and index.group(1) == cuda.group(1) + cuda.group(2), "torch's CUDA build is the image's"
    assert "--index-url ${TORCH_INDEX}" in dockerfile
    assert '"/opt/qdeep[gpu]"' in dockerfile and "faiss-cpu" not in dockerfile, "faiss-gpu only, never faiss-cpu"


def test_dockerignore_keeps_what_the_dockerfile_copies():
    """The build context is the repository root; an ignored COPY source would fail the build."""
    rules = [r.strip() for r in (REPO / ".dockerignore").read_text().splitlines()
             if r.strip() and not r.strip().startswith("#")]

    def kept(path: str) -> bool:
        keep = True
        for rule in rules:  # the last matching rule wins, as in Docker
            neg = rule.startswith("!")
            pattern = rule[1:] if neg else rule
            if fnmatch(path, pattern.rstrip("/")) or fnmatch(path.split("/")[0], pattern.rstrip("/")):
                keep = neg
        return keep

    copies = [line.split()[1:] for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY ")]
    sources = [w for words in copies for w in [w for w in words if not w.startswith("--")][:-1]]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: no such file in the repository"
        assert kept(src), f".dockerignore drops {src}, which docker/Dockerfile copies"
    assert not kept(".venv") and not kept("demo"), ".dockerignore should keep local environments out"


# -------------------------------------------------------------------------------------------- scripts/submit.sh


def run_submit(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return subprocess.run(["bash", str(SUBMIT), *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=60)


def commands(stdout: str) -> list[list[str]]:
    """The dry run's commands, each starting with `ray job submit`."""
    words, out = shlex.split(stdout), []
    for i, w in enumerate(words):
        if words[i:i + 3] == ["ray", "job", "submit"]:
            out.append([])
        out[-1].append(w)
    return out


def parse_job_submit(argv: list[str]) -> dict:
    """Ray's own `ray job submit` CLI parses the words (without running), so every option is a real one."""
    from ray.dashboard.modules.job.cli import submit

    assert argv[:3] == ["ray", "job", "submit"], argv
    return submit.make_context("submit", argv[3:]).params


def test_submit_sh_is_valid_bash_and_executable():
    assert subprocess.run(["bash", "-n", str(SUBMIT)]).returncode == 0
    assert SUBMIT.stat().st_mode & stat.S_IXUSR, "scripts/submit.sh should be executable"


def test_dry_run_prints_the_job_submit_command(tmp_path):
    qdeep_args = ["train", "--data", "/home/ray/data", "--out", "/home/ray/head/results/my run",
                  "--name", "it's", "--lr", "3e-4", "--storage-path", "s3://b/q", "--tracking-uri", ""]
    r = run_submit("--dry-run", *qdeep_args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    [cmd] = commands(r.stdout)
    p = parse_job_submit(cmd)
    assert p["address"] == "http://127.0.0.1:8265"
    assert p["working_dir"] == "."
    assert p["no_wait"] is False
    assert list(p["entrypoint"]) == ["qdeep", *qdeep_args], "qdeep's arguments must reach the job unchanged"
    assert cmd[cmd.index("--") + 1:] == ["qdeep", *qdeep_args]

    from ray.runtime_env import RuntimeEnv

    env = json.loads(p["runtime_env_json"])
    RuntimeEnv(**env)  # Ray accepts it
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    assert "MLFLOW_TRACKING_URI" not in env["env_vars"], "the nodes carry the head's tracking URI"


def test_runtime_env_uploads_the_code_and_nothing_heavy(tmp_path):
    from ray._private.runtime_env.packaging import _get_excludes

    [cmd] = commands(run_submit("--dry-run", "train", cwd=tmp_path).stdout)
    excluded = _get_excludes(REPO, json.loads(parse_job_submit(cmd)["runtime_env_json"])["excludes"])
    code = [p for p in (REPO / "qdeep").rglob("*.py") if "__pycache__" not in p.parts]
    assert code and not [p for p in code if excluded(p)], "the package itself (qdeep/data too) must be uploaded"
    assert not excluded(REPO / "pyproject.toml")
    for heavy in (".venv/bin/python", ".git/HEAD", "data/train-jpg/a.jpg", "demo/mlflow.db",
                  "runs/x/ray_results/ckpt", "mlflow.db", "mlruns/0/meta.yaml"):
        assert excluded(REPO / heavy), f"{heavy} would be uploaded with every job"


def test_address_options_and_flags(tmp_path):
    def params(*args, env=None):
        r = run_submit("--dry-run", *args, cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stderr
        return parse_job_submit(commands(r.stdout)[-1])

    assert params("tune", env={"RAY_ADDRESS": "http://10.0.0.5:8265"})["address"] == "http://10.0.0.5:8265"
    both = {"RAY_ADDRESS": "http://a:8265", "RAY_API_SERVER_ADDRESS": "http://b:8265"}
    assert params("tune", env=both)["address"] == "http://b:8265", "Ray's own precedence"
    assert params("--address", "http://c:8265", "tune", env=both)["address"] == "http://c:8265"
    p = params("--no-wait", "--submission-id", "sweep-1", "--env", "A=b=c", "--", "tune", "--no-wait")
    assert p["no_wait"] is True and p["submission_id"] == "sweep-1"
    assert json.loads(p["runtime_env_json"])["env_vars"]["A"] == "b=c"
    assert list(p["entrypoint"]) == ["qdeep", "tune", "--no-wait"], "options after COMMAND belong to qdeep"


@pytest.mark.parametrize("args,message", [
    ((), "no qdeep command"),
    (("--bogus", "train"), "unknown option --bogus"),
    (("--env", "no-equals", "train"), "KEY=VALUE"),
    (("--gpus", "two", "train"), "whole number"),
    (("--address",), "needs a value"),
])
def test_bad_usage_exits_2_with_a_message(tmp_path, args, message):
    r = run_submit(*args, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr, (r.returncode, r.stderr)


def test_help(tmp_path):
    r = run_submit("--help", cwd=tmp_path)
    assert r.returncode == 0 and "usage: scripts/submit.sh" in r.stdout


def test_gpus_first_submits_a_scale_up_job_that_requests_waits_and_releases(tmp_path):
    r = run_submit("--dry-run", "--gpus", "2", "--gpus-timeout", "0", "train", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pre, main = commands(r.stdout)
    assert list(parse_job_submit(main)["entrypoint"])[:2] == ["qdeep", "train"]
    entry = list(parse_job_submit(pre)["entrypoint"])
    assert entry[:2] == ["python", "-c"] and entry[3:] == ["2", "0"]

    # Run that code against a stand-in `ray` that records the autoscaler requests.
    fake = tmp_path / "fake"
    (fake / "ray" / "autoscaler").mkdir(parents=True)
    log = tmp_path / "requests.jsonl"
    (fake / "ray" / "__init__.py").write_text(
        "import os\n"
        "def init(): pass\n"
        "def cluster_resources(): return {'CPU': 6, 'GPU': float(os.environ['FAKE_GPUS'])}\n")
    (fake / "ray" / "autoscaler" / "__init__.py").write_text("")
    (fake / "ray" / "autoscaler" / "sdk.py").write_text(
        "import json, os\n"
        "def request_resources(num_cpus=None, bundles=None):\n"
        f"    open({str(log)!r}, 'a').write(json.dumps([num_cpus, bundles]) + '\\n')\n")

    def run(gpus_up):
        log.unlink(missing_ok=True)
        r = subprocess.run([sys.executable, "-c", entry[2], "2", "0"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(fake), "FAKE_GPUS": gpus_up})
        return r, [json.loads(line) for line in log.read_text().splitlines()]

    ok, calls = run("2")
    assert ok.returncode == 0 and "2 GPUs up" in ok.stdout, ok.stderr
    assert calls == [[None, [{"GPU": 1}, {"GPU": 1}]], [0, None]], "request, then withdraw the request"
    late, calls = run("1")
    assert late.returncode != 0 and "only 1 of 2 GPUs up" in late.stderr
    assert calls[-1] == [0, None], "the request is withdrawn even when giving up"


def test_without_dry_run_it_runs_those_commands_from_the_repository_root(tmp_path):
    """A stand-in `ray` on PATH records what it was called with, and where."""
    bin_dir, record = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    fake_ray = bin_dir / "ray"
    fake_ray.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        f"open({str(record)!r}, 'a').write(json.dumps([os.getcwd(), sys.argv[1:]]) + '\\n')\n")
    fake_ray.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    args = ["--gpus", "1", "train", "--out", "/home/ray/head/results/a b"]

    expected = commands(run_submit("--dry-run", *args, cwd=tmp_path, env=env).stdout)
    r = run_submit(*args, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [Path(cwd) for cwd, _ in calls] == [REPO, REPO], "--working-dir . must be the repository root"
    assert [["ray", *argv] for _, argv in calls] == expected


# ------------------------------------------------------------------------------------------------------ README


def cluster_section() -> str:
    text = (REPO / "README.md").read_text()
    heads = re.findall(r"^## .*$", text, flags=re.M)
    assert heads and heads[-1] == "## Run on a cluster", "README should end with the section 'Run on a cluster'"
    return text[text.index("## Run on a cluster"):]


def readme_submit_examples() -> list[list[str]]:
    """Runs at collection: without the section it finds none, and the test above says why."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Run on a cluster"):] if "## Run on a cluster" in text else ""
    lines = re.sub(r"\\\n\s*", " ", section).splitlines()
    return [shlex.split(line.strip())[1:] for line in lines if line.strip().startswith("scripts/submit.sh ")]


def test_readme_section_covers_the_cluster_life_cycle():
    section = cluster_section()
    for needle in ("ray up cluster.yaml", "ray down cluster.yaml", "docker push", "ray dashboard cluster.yaml",
                   "ray attach cluster.yaml -p 5000", "--storage-path s3://", "idle_timeout_minutes"):
        assert needle in section, f"README's cluster section should show {needle!r}"
    commands_shown = set()
    for args in readme_submit_examples():
        commands_shown.add(next(a for a in args if not a.startswith("-") and not a.isdigit()))
    assert {"train", "tune", "deepcluster"} <= commands_shown, commands_shown

    # `ray up` and `ray job submit` on the user's machine must be the image's Ray.
    local = re.findall(r'"ray\[default\]==([^"]+)"', section)
    image = re.findall(r'"ray==([^"]+)"', DOCKERFILE.read_text())
    assert local and local == image, f"README installs ray {local} locally, the image has {image}"


@pytest.mark.parametrize("args", readme_submit_examples(), ids=lambda a: next(x for x in a if x.isalpha()))
def test_readme_submit_examples_run(tmp_path, args):
    """Each example goes through submit.sh, and its qdeep part through qdeep's own parser."""
    r = run_submit("--dry-run", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    entry = list(parse_job_submit(commands(r.stdout)[-1])["entrypoint"])
    from qdeep.cli import build_parser

    parser = build_parser()
    subcommands = next(a.choices for a in parser._actions if getattr(a, "choices", None) and a.dest == "command")
    if entry[1] not in subcommands:
        pytest.skip(f"qdeep {entry[1]} is not in the CLI yet")
    try:
        parser.parse_args(entry[1:])
    except SystemExit:
        pytest.fail(f"README example is not a valid qdeep command line: {' '.join(entry)}")
