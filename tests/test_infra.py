"""Cluster, job and infrastructure files: they parse, validate against the schemas their tools
ship (Ray's cluster schema, Ray Serve's deploy schema, Ray's submit_job signature, our stage
configs), agree with each other, and the job entrypoints run.

No cloud, Kubernetes or Docker engine here: what those would check at apply time is checked
structurally (see infra/terraform/README.md for what `terraform validate` would add).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
JOBS = REPO / "jobs"
TERRAFORM = REPO / "infra" / "terraform"
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"
STAGES = ["kit", "distill", "prune", "finetune", "tune", "eval", "serve", "run", "plan", "massv"]
GPU_CONFIGS = [JOBS / "configs" / "llama70b_to_llama3b.yaml", JOBS / "configs" / "llama70b_to_qwen_uag.yaml"]
SERVE_IMPORT_PATH = "sd2_ray.serve.app:app_builder"
YAML_FILES = sorted(CLUSTERS.glob("*.yaml")) + sorted(JOBS.rglob("*.yaml"))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# --- every YAML parses ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yaml_parses_to_mappings(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) and d for d in docs), f"{rel(path)}: empty or not a mapping"


# --- the Ray cluster launcher YAML -------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    return load(CLUSTERS / "aws-gpu.yaml")


def test_cluster_yaml_validates_against_rays_schema(cluster):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    validate_config(prepare_config(cluster))  # what `ray up` runs: defaults filled, head type checked
    broken = {**cluster, "idle_timeout_minute": 5}
    with pytest.raises(jsonschema.ValidationError):  # the schema really rejects a typo'd key
        jsonschema.validate(broken, schema)


def test_cluster_head_takes_no_work_and_gpu_workers_autoscale(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    gpu = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    assert max(t["resources"]["GPU"] for t in gpu.values()) >= 8, "no 8-GPU type for a TP-8 70B target"
    assert len(gpu) >= 2, "want separate generation and training GPU types"
    for name, t in gpu.items():
        assert t["min_workers"] == 0 < t["max_workers"], f"{name}: GPU types scale from zero"
    assert sum(t["max_workers"] for t in workers.values()) >= cluster["max_workers"] > 0
    assert cluster["idle_timeout_minutes"] > 0
    for name, t in types.items():
        arn = t["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), name
    assert any("pip install" in c and "/srv/sd2-ray" in c for c in cluster["setup_commands"])


def key_lines(text: str):
    """(line number, generic key path, commented?) for every mapping key of a block-style YAML.

    A key counts as commented with an inline comment or a comment line right above it. The
    generic path replaces node type names by '*', so a key documented on one node type does not
    need repeating on the next."""
    stack: list[tuple[int, str]] = []
    lines = text.splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)(- )?([A-Za-z_][\w.-]*):(\s|$)", line)
        if not match:
            continue
        indent = len(match.group(1)) + (2 if match.group(2) else 0)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [match.group(3)]
        if len(path) >= 2 and path[0] == "available_node_types":
            path[1] = "*"
        stack.append((indent, match.group(3)))
        above = lines[number - 1].strip() if number else ""
        yield number + 1, ".".join(path), "#" in line or above.startswith("#")


def test_every_cluster_key_is_commented():
    text = (CLUSTERS / "aws-gpu.yaml").read_text()
    commented: dict[str, bool] = {}
    for _, path, has_comment in key_lines(text):
        commented[path] = commented.get(path, False) or has_comment
    missing = sorted(p for p, ok in commented.items() if not ok)
    assert not missing, f"clusters/aws-gpu.yaml: keys without a comment: {missing}"
    node_types = load(CLUSTERS / "aws-gpu.yaml")["available_node_types"]
    for number, path, has_comment in key_lines(text):  # each node type explains itself
        if path == "available_node_types.*" and not has_comment:
            pytest.fail(f"clusters/aws-gpu.yaml:{number}: node type without a comment ({list(node_types)})")


# --- KubeRay and Serve -------------------------------------------------------------------------


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", spec["rayVersion"]), where
    import ray

    assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion differs from the pinned ray"
    assert spec["enableInTreeAutoscaling"] is True, where
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", f"{where}: the head must take no work"
    assert head["template"]["spec"]["containers"][0]["image"], where
    gpu_groups = 0
    for group in spec["workerGroupSpecs"]:
        name = f"{where}: group {group.get('groupName')}"
        assert group["groupName"] and "rayStartParams" in group, name
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        container = group["template"]["spec"]["containers"][0]
        limits = container["resources"]["limits"]
        assert container["image"] and limits, name
        gpu_groups += int(limits.get("nvidia.com/gpu", 0)) > 0
    assert gpu_groups >= 1, f"{where}: no GPU worker group"


def test_kuberay_rayjob():
    job = load(CLUSTERS / "kuberay-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["backoffLimit"] >= 1 and spec["submitterConfig"]["backoffLimit"] >= 1
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/srv/sd2-ray"  # where infra/docker puts the checkout
    script, config = re.fullmatch(r"python (jobs/\w+\.py) --config (\S+)", spec["entrypoint"]).groups()
    assert (REPO / script).is_file() and (REPO / config).is_file(), spec["entrypoint"]
    check_ray_cluster_spec(spec["rayClusterSpec"], "kuberay-rayjob.yaml")


def test_kuberay_rayservice_serves_the_same_app_as_serve_config():
    from ray.serve.schema import ServeDeploySchema

    service = load(CLUSTERS / "kuberay-rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    standalone = load(CLUSTERS / "serve-config.yaml")
    assert embedded["applications"] == standalone["applications"]
    check_ray_cluster_spec(service["spec"]["rayClusterConfig"], "kuberay-rayservice.yaml")


def test_serve_config_validates_and_names_the_app_builder():
    from ray.serve.schema import ServeDeploySchema

    config = load(CLUSTERS / "serve-config.yaml")
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == SERVE_IMPORT_PATH
    assert {"target", "drafter", "num_speculative_tokens"} <= set(app.args)
    if (REPO / "sd2_ray" / "serve" / "app.py").exists():  # the builder exists, args are its fields
        import importlib

        from sd2_ray.serve.config import ServeConfig

        module, name = SERVE_IMPORT_PATH.split(":")
        assert callable(getattr(importlib.import_module(module), name))
        ServeConfig.model_validate(app.args)


def test_service_account_matches_terraform_irsa_defaults():
    account = load(CLUSTERS / "kuberay-serviceaccount.yaml")
    variables = terraform_blocks()["variable"]
    assert account["metadata"]["name"] == variables["k8s_service_account"]["default"]
    assert account["metadata"]["namespace"] == variables["k8s_namespace"]["default"]
    for manifest in ("kuberay-rayjob.yaml", "kuberay-rayservice.yaml"):
        assert f"serviceAccountName: {account['metadata']['name']}" in (CLUSTERS / manifest).read_text()


# --- job entrypoints, specs and configs --------------------------------------------------------

HELP_DRIVER = """
import contextlib, io, json, runpy, sys
results = {}
for stage, path in json.loads(sys.argv[1]).items():
    sys.argv = [path, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    results[stage] = [code, out.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def help_runs():
    """`python jobs/<stage>.py --help` for every stage: each script run as __main__ (runpy), all
    in one fresh interpreter started outside the repository, so the CLI's imports are paid once."""
    scripts = {stage: str(JOBS / f"{stage}.py") for stage in STAGES}
    res = subprocess.run(
        [sys.executable, "-c", HELP_DRIVER, json.dumps(scripts)],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_job_entrypoint_runs_as_a_plain_script():
    """One real `python jobs/run.py --help` from outside the checkout: the script finds sd2_ray."""
    res = subprocess.run(
        [sys.executable, str(JOBS / "run.py"), "--help"],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage: sd2 run" in res.stdout


@pytest.mark.parametrize("stage", STAGES)
def test_job_entrypoint_help(stage, help_runs):
    code, out = help_runs[stage]
    assert code == 0, out
    assert f"usage: sd2 {stage}" in out  # dispatched through sd2_ray.cli, from any cwd


@pytest.mark.parametrize("stage", STAGES)
def test_job_entrypoint_dispatches_its_stage_with_the_checkout_first(stage, monkeypatch):
    """Run as ``__main__`` (as ``ray job submit -- python jobs/<stage>.py ARGS`` does), the script
    puts the checkout first on sys.path and exits with what ``sd2_ray.cli.main([stage, *ARGS])``
    returns (the CLI is replaced by a recorder: nothing runs)."""
    import runpy

    import sd2_ray.cli

    calls = []

    def recorder(argv):
        calls.append(list(argv))
        return 3

    monkeypatch.setattr(sd2_ray.cli, "main", recorder)
    monkeypatch.setattr(sys, "path", ["/elsewhere", *sys.path])
    monkeypatch.setattr(sys, "argv", [str(JOBS / f"{stage}.py"), "--output", "o", "a.b=1"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(JOBS / f"{stage}.py"), run_name="__main__")
    assert calls == [[stage, "--output", "o", "a.b=1"]]
    assert exited.value.code == 3
    assert sys.path[0] == str(REPO)  # the uploaded checkout wins over any installed sd2_ray


def test_every_cli_command_has_a_job_entrypoint():
    from sd2_ray.cli import COMMANDS

    assert sorted(COMMANDS) == sorted(STAGES)


def submit_module():
    sys.path.insert(0, str(JOBS))
    try:
        import submit
    finally:
        sys.path.remove(str(JOBS))
    return submit


@pytest.mark.parametrize("path", sorted((JOBS / "specs").glob("*.yaml")), ids=rel)
def test_job_spec_is_valid_for_rays_submit_job(path):
    from ray.runtime_env import RuntimeEnv

    kwargs, retries, delay = submit_module().load_spec(str(path))
    RuntimeEnv(**kwargs["runtime_env"])  # Ray's own validation of the runtime_env
    assert kwargs["runtime_env"]["working_dir"] == "."
    assert all(isinstance(v, str) for v in kwargs["metadata"].values())
    # the cluster head offers 0 CPUs: a GPU cluster's driver reserves one on a CPU worker; the
    # tiny spec's driver (a 2-core `ray start --head`) reserves none, leaving both to the stages
    assert kwargs["entrypoint_num_cpus"] >= (0 if path.name == "tiny.yaml" else 1)
    assert retries >= 0 and delay >= 0
    script, config = re.fullmatch(
        r"python (jobs/\w+\.py) --config (\S+)( --output \S+)?", kwargs["entrypoint"]
    ).groups()[:2]
    assert (REPO / script).is_file()
    if not config.endswith(("tiny.yaml", "tiny-tune.yaml")):  # those two are written elsewhere
        assert (REPO / config).is_file(), config


def test_job_spec_errors_are_one_line(tmp_path):
    from sd2_ray.errors import ConfigError

    submit = submit_module()
    bad = tmp_path / "bad.yaml"
    bad.write_text("entrypoint: python jobs/run.py\nmax_retry: 2\n")
    with pytest.raises(ConfigError, match="field 'max_retry': not a submit_job argument"):
        submit.load_spec(str(bad))
    bad.write_text("entrypoint: python jobs/run.py\nmax_retries: -1\n")
    with pytest.raises(ConfigError, match="max_retries"):
        submit.load_spec(str(bad))


def s3_strings(node, where=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from s3_strings(value, f"{where}.{key}" if where else key)
    elif isinstance(node, str) and node.startswith("s3://"):
        yield where, node


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=rel)
def test_gpu_config_sections(path):
    from sd2_ray.pipeline.chain import stage_from_pipeline
    from sd2_ray.pipeline.config import PipelineConfig

    config = load(path)
    run_prefix = config["output"]
    bucket = re.fullmatch(r"s3://([a-z0-9.-]+)/[\w.-]+", run_prefix).group(1)
    assert config["distill"]["engine"] == "vllm" and config["distill"]["tensor_parallel_size"] == 8
    assert config["finetune"]["zero_stage"] in (2, 3) and config["finetune"]["use_gpu"] is True
    for where, value in s3_strings(config):
        assert value.startswith(f"s3://{bucket}/"), f"{where} leaves the bucket"
    PipelineConfig.load(str(path))  # every section holds its stage's real fields
    for section in ("distill", "prune", "finetune", "eval"):
        stage = stage_from_pipeline(str(path), section, {})  # what `python jobs/<stage>.py --config` runs
        assert stage.output.startswith(run_prefix + "/"), f"{section}.output outside {run_prefix}"


# --- terraform ---------------------------------------------------------------------------------


def unquote(value):
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def terraform_blocks() -> dict[str, dict]:
    """{block kind: {name: body}} over every .tf file, via python-hcl2 (a real HCL parser)."""
    import hcl2

    out: dict[str, dict] = {"resource": {}, "data": {}, "variable": {}, "output": {}}
    for path in sorted(TERRAFORM.glob("*.tf")):
        with path.open() as f:
            parsed = hcl2.load(f)
        for kind in ("variable", "output"):
            for block in parsed.get(kind, []):
                for name, body in block.items():
                    out[kind][unquote(name)] = {k: unquote(v) for k, v in body.items()}
        for kind in ("resource", "data"):
            for block in parsed.get(kind, []):
                for rtype, named in block.items():
                    for name, body in named.items():
                        out[kind][f"{unquote(rtype)}.{unquote(name)}"] = body
    return out


@pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform not on PATH")
def test_terraform_fmt():
    res = subprocess.run(
        ["terraform", "fmt", "-check", "-recursive", "-diff", str(TERRAFORM)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_terraform_declarations_and_references_resolve():
    blocks = terraform_blocks()
    for name, body in blocks["variable"].items():
        assert body.get("description") and body.get("type"), f"variable {name}"
    for name, body in blocks["output"].items():
        assert body.get("description") and "value" in body, f"output {name}"
    text = "\n".join(p.read_text() for p in TERRAFORM.glob("*.tf"))
    for var in set(re.findall(r"\bvar\.(\w+)", text)):
        assert var in blocks["variable"], f"var.{var} is not declared"
    declared = set(blocks["resource"]) | {f"data.{k}" for k in blocks["data"]}
    for ref in set(re.findall(r"\b((?:data\.)?aws_\w+\.\w+)", text)):
        if not ref.startswith("data.") and re.search(rf"data\.{re.escape(ref)}\b", text) and ref not in declared:
            continue  # the tail of a data.* reference
        assert ref in declared, f"{ref} is referenced but not declared"
    assert {
        "bucket_name",
        "head_instance_profile_arn",
        "worker_instance_profile_arn",
        "irsa_role_arn",
        "ecr_repository_url",
    } <= set(blocks["output"])


def test_terraform_bucket_is_hardened():
    resources = terraform_blocks()["resource"]
    block = resources["aws_s3_bucket_public_access_block.artifacts"]
    assert all(
        block[k] is True
        for k in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets")
    )
    versioning = resources["aws_s3_bucket_versioning.artifacts"]["versioning_configuration"][0]
    assert unquote(versioning["status"]) == "Enabled"
    assert "aws_s3_bucket_server_side_encryption_configuration.artifacts" in resources
    rules = resources["aws_s3_bucket_lifecycle_configuration.artifacts"]["rule"]
    checkpoint_rule = [r for r in rules if "checkpoints_prefix" in str(r.get("filter"))]
    assert checkpoint_rule and checkpoint_rule[0].get("expiration"), "checkpoints must expire"


def policy_statements():
    for name, body in terraform_blocks()["data"].items():
        if name.startswith("aws_iam_policy_document."):
            for statement in body.get("statement", []):
                yield name, statement


def test_terraform_s3_permissions_name_only_the_bucket():
    bucket_refs = (
        "${local.bucket_arn}",
        "${local.bucket_arn}/*",
        "${aws_s3_bucket.artifacts.arn}",
        "${aws_s3_bucket.artifacts.arn}/*",
    )
    s3_allows = 0
    for name, statement in policy_statements():
        actions = [unquote(a) for a in statement.get("actions", [])]
        if unquote(statement.get("effect", '"Allow"')) != "Allow" or not any(a.startswith("s3:") for a in actions):
            continue
        s3_allows += 1
        assert all(a.startswith("s3:") and "*" not in a for a in actions), f"{name}: {actions}"
        resources = [unquote(r) for r in statement["resources"]]
        assert resources and all(r in bucket_refs for r in resources), f"{name}: {resources}"
        object_actions = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"} & set(actions)
        if object_actions:  # object actions on objects only, bucket actions on the bucket only
            assert all(r.endswith("/*") for r in resources), name
        else:
            assert not any(r.endswith("/*") for r in resources), name
    assert s3_allows == 2


def test_terraform_names_match_the_cluster_files(cluster):
    variables = terraform_blocks()["variable"]
    assert cluster["cluster_name"] == variables["cluster_name"]["default"]
    prefix = variables["name_prefix"]["default"]
    types = cluster["available_node_types"]
    for name, t in types.items():
        role = "head" if name == cluster["head_node_type"] else "worker"
        assert t["node_config"]["IamInstanceProfile"]["Arn"].endswith(f":instance-profile/{prefix}-{role}")
    iam = (TERRAFORM / "iam.tf").read_text()
    assert '"ec2:ResourceTag/ray-cluster-name"' in iam  # the tag Ray's AWS provider sets
    from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME

    assert TAG_RAY_CLUSTER_NAME == "ray-cluster-name"


# --- the container image -----------------------------------------------------------------------

DOCKER_INSTRUCTIONS = {
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            keyword, _, args = pending.partition(" ")
            out.append((keyword, args.strip()))
            pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def test_dockerfile_sanity():
    import tomllib

    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    unknown = [k for k, _ in instructions if k.upper() not in DOCKER_INSTRUCTIONS or k != k.upper()]
    assert not unknown, f"unknown Dockerfile instructions: {unknown}"
    assert instructions[0][0] == "FROM"
    image = instructions[0][1].split()[0]
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), image
    run = " ".join(a for k, a in instructions if k == "RUN")
    pins = dict(re.findall(r'"?(torch|vllm)==([\w.+]+)"?', run))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert f"torch=={pins['torch']}" in project["dependencies"], "Dockerfile torch pin != pyproject"
    assert ".[gpu]" in run and any(d.startswith("vllm==") for d in project["optional-dependencies"]["gpu"])
    assert "python3.11" in run
    ignored = (REPO / ".dockerignore").read_text().split()
    for keyword, args in instructions:
        if keyword == "COPY":
            for source in args.split()[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                assert source not in ignored, f"COPY {source}: excluded by .dockerignore"


# --- the retry wrapper against a real Ray job server ------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
def test_submit_resubmits_a_failed_job_on_a_real_cluster(job_server, tmp_path, capsys):
    """A job that fails on its first attempt: with max_retries 1 the wrapper resubmits it and
    succeeds; with max_retries 0 it reports the failure (exit 1)."""
    submit = submit_module()
    fail_once = (
        "import os, sys; p = sys.argv[1]; seen = os.path.exists(p); open(p, 'w').close(); sys.exit(0 if seen else 3)"
    )
    for retries, expected_code, expected_attempts in ((1, 0, 2), (0, 1, 1)):
        marker = tmp_path / f"marker-{retries}"
        spec = tmp_path / f"spec-{retries}.yaml"
        spec.write_text(
            yaml.safe_dump(
                {
                    "entrypoint": f'{sys.executable} -c "{fail_once}" {marker}',
                    "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1"}},
                    "entrypoint_num_cpus": 1,
                    "metadata": {"stage": "test"},
                    "max_retries": retries,
                    "retry_delay_s": 0,
                }
            )
        )
        code = submit.main([str(spec), "--address", job_server, "--poll-s", "0.5"])
        out = capsys.readouterr().out
        assert code == expected_code, out
        assert f"after {expected_attempts} attempt(s)" in out
