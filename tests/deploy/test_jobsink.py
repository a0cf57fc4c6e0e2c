"""Long videos through Knative's JobSink (knative/overlays/jobsink, docs/jobsink.md): the
overlay builds, the JobSink matches the vendored CRD schema and carries a valid batch/v1
Job, the compress-video Trigger points at it, and the Job's entry point runs an event
file through the real worker and database with the documented exit statuses."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import kubernetes_validate
import pytest

from shared import db
from shared.tasks import repository as tasks
from tests.deploy.k8s import ROOT, by_kind, crd_dir, kustomize, load_crd_schemas, schema_errors

VENDORED = crd_dir()  # vendor/knative-crds: upstream CRDs, Apache-2.0


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return kustomize(ROOT / "knative" / "overlays" / "jobsink")


def test_the_vendored_crd_is_the_upstream_file_with_its_licence():
    text = (VENDORED / "eventing_jobsink.yaml").read_text()
    assert "Licensed under the Apache License, Version 2.0" in text
    assert "jobsinks.sinks.knative.dev" in text
    assert "eventing_jobsink.yaml" in (VENDORED / "README.md").read_text()


def test_the_jobsink_matches_its_crd_and_holds_a_valid_job(objects):
    schemas = load_crd_schemas(VENDORED)
    sinks = by_kind(objects, "JobSink")
    assert list(sinks) == ["compress-video-job"]
    sink = dict(sinks["compress-video-job"])
    assert schema_errors(sink, schemas[("sinks.knative.dev/v1alpha1", "JobSink")]) == []
    # spec.job is opaque to the CRD: check it as the Job the controller will create
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "compress-video-job-x"},
           **{k: v for k, v in sink["spec"]["job"].items() if k != "metadata"}}
    kubernetes_validate.validate(job, "1.32.0", strict=True)
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    main = pod["containers"][0]
    assert main["image"] == "taskforge/compress-video:0.1.0"
    assert main["command"][-1] == "/etc/jobsink-event/event"
    assert main["command"][:3] == ["python", "-m", "functions.compress_video.job"]
    assert sink["metadata"]["namespace"] == "taskforge"


def test_the_compress_video_trigger_delivers_to_the_jobsink(objects):
    triggers = by_kind(objects, "Trigger")
    ref = triggers["compress-video"]["spec"]["subscriber"]["ref"]
    assert ref == {"apiVersion": "sinks.knative.dev/v1alpha1", "kind": "JobSink", "name": "compress-video-job"}
    schemas = load_crd_schemas(crd_dir())
    for name, trigger in triggers.items():
        assert schema_errors(dict(trigger), schemas[("eventing.knative.dev/v1", "Trigger")]) == [], name
    # the other workers stay on their Services
    assert triggers["resize-image"]["spec"]["subscriber"]["ref"]["kind"] == "Service"


def run_job(settings, path: Path) -> subprocess.CompletedProcess[str]:
    from infra.runtime.launcher import settings_env

    env = {**settings_env(settings), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "functions.compress_video.job", str(path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_the_job_entry_point_records_the_outcome_and_exits_by_the_rules(settings, tmp_path):
    with db.connection(settings) as conn:
        user = conn.execute("INSERT INTO users (email, password_hash) VALUES (%s, 'x') RETURNING id",
                            (f"job-{uuid.uuid4().hex[:8]}@example.com",)).fetchone()
        sub = tasks.create_task(conn, user_id=str(user["id"]), task_type="compress-video",
                                payload={"source": {"url": "http://127.0.0.1:9/missing.mp4"}})
    task_id = str(sub.row["id"])
    event = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/taskforge/gateway",
             "type": "com.taskforge.compress-video.requested", "subject": task_id,
             "datacontenttype": "application/json",
             "data": {"task_id": task_id, "user_id": str(user["id"]), "type": "compress-video",
                      "payload": sub.row["payload"]}}
    path = tmp_path / "event"
    path.write_text(json.dumps(event))
    out = run_job(settings.replace(max_attempts=1), path)
    # the source cannot be fetched (nothing listens on port 9): recorded as failed, Job done
    assert out.returncode in (0, 1), out.stderr
    with db.connection(settings) as conn:
        row = conn.execute("SELECT status, attempts FROM tasks WHERE id = %s", (task_id,)).fetchone()
    assert row["attempts"] == 1 and row["status"] in ("failed", "retrying")
    assert (out.returncode == 0) == (row["status"] == "failed")
    path.write_text("{not an event")
    assert run_job(settings, path).returncode == 2
    assert run_job(settings, tmp_path / "absent").returncode == 2
