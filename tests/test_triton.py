"""medge export-triton: the repository it writes, and that repository served for real by Triton.

Export tests run in the test environment. The serving tests start the
``tritonserver`` that nvidia-pytriton ships (Triton 24.10, python backend
only) on 127.0.0.1 with free ports, in a separate virtual environment with
numpy < 2 (the 24.10 python backend returns empty outputs under numpy 2),
made once by ``medge.serve.triton.serving_environment`` and cached under
``~/.cache/medge`` (``MEDGE_TRITON_ENV`` overrides). Clients (tritonclient,
HTTP and gRPC) run in that environment too, through a small probe script;
the answers are compared here with medge.load on the same files. The
onnxruntime and tensorrt_plan models, which this server cannot run, are
checked against Triton's own configuration schema.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from medge.errors import BundleError, MedgeError, SignatureError

pytest.importorskip("onnxruntime", reason='onnxruntime is not installed: pip install "medge[convert]"')


# ---------------------------------------------------------------------------- helpers


def _copy_bundle(demo_bundle, tmp_path) -> Path:
    copy = tmp_path / "copy.medge"
    shutil.copytree(demo_bundle.bundle_path, copy)
    return copy


def _edit_manifest(bundle: Path, edit) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _add_fake_engines(bundle: Path) -> None:
    """Two full-TensorRT INT8 plans (sm 8.6 and 9.0) and a TensorRT-RTX one: bytes only, for the configs."""
    import hashlib

    engines = [("tensorrt", "8.6", "trt_int8_sm86.engine"), ("tensorrt", "9.0", "trt_int8_sm90.engine"),
               ("tensorrt_rtx", None, "rtx_int8.engine")]
    (bundle / "engines").mkdir(exist_ok=True)

    def edit(manifest):
        for flavour, cc, name in engines:
            data = f"fake {flavour} plan {cc}".encode()
            (bundle / "engines" / name).write_bytes(data)
            manifest["files"][f"engines/{name}"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            manifest["engines"].append({
                "file": f"engines/{name}", "precision": "int8", "flavour": flavour,
                "flavour_version": "10.13.0" if flavour == "tensorrt" else "1.2.0",
                "compute_capabilities": [cc] if cc else ["8.6", "8.9"],
                "gpu": {"name": f"GPU sm{cc}", "compute_capability": cc, "sm_count": 80} if cc else None,
                "profile": manifest["profile"], "size_bytes": len(data)})

    _edit_manifest(bundle, edit)


def _config(repository: Path, model: str) -> str:
    return (repository / model / "config.pbtxt").read_text()


@pytest.fixture(scope="module")
def repository(demo_bundle, tmp_path_factory):
    from medge.serve.triton import export_triton

    return export_triton(demo_bundle.bundle_path, tmp_path_factory.mktemp("triton") / "repo")


# ---------------------------------------------------------------------------- export (no server)


def test_export_writes_each_precision_as_onnxruntime_medge_and_ensembles(repository, demo_bundle):
    from medge.bundle import Bundle
    from medge.serve.triton import verify_export

    bundle = Bundle.open(demo_bundle.bundle_path)
    manifest = bundle.manifest
    repo = repository.repository
    assert set(repository.ensembles) == set(manifest["graphs"])  # the demo's gates all passed
    profile = manifest["profile"]
    for graph, ensemble in repository.ensembles.items():
        base = ensemble
        onnx = repo / f"{base}_net_onnxruntime" / "1" / "model.onnx"
        assert onnx.read_bytes() == bundle.read_verified(manifest["graphs"][graph]["file"])
        config = _config(repo, f"{base}_net_onnxruntime")
        assert 'backend: "onnxruntime"' in config and f"max_batch_size: {profile['max']}" in config
        assert f"preferred_batch_size: [{profile['opt']}, {profile['max']}]" in config
        assert "kind: KIND_CPU" in config
        dtype = "TYPE_FP16" if manifest["graphs"][graph]["input_dtype"] == "float16" else "TYPE_FP32"
        assert f'name: "image"\n  data_type: {dtype}\n  dims: [1, 128, 128]' in config
        assert (repo / f"{base}_net_medge" / "1" / "model.py").is_file()
        assert 'platform: "ensemble"' in _config(repo, ensemble)
        assert f"{base}_net_medge" in _config(repo, repository.medge_ensembles[graph])
        assert 'name: "DICOM"\n  data_type: TYPE_STRING' in _config(repo, ensemble)
    pre = _config(repo, "medge_demo_lesion_preprocess")
    assert 'backend: "python"' in pre and "medge_preprocess_spec" in pre and "medge_envelope" in pre
    assert (repo / "medge_manifest.json").read_bytes() == bundle.manifest_bytes
    record = verify_export(repo)
    assert record["bundle"]["manifest_sha256"] == bundle.manifest_sha256
    assert "README.md" in record["files"] and "medge_demo_lesion_fp32_net_medge/1/model.onnx" in record["files"]
    readme = (repo / "README.md").read_text()
    assert "EXECUTION_ENV_PATH" in readme and "nvcr.io/nvidia/tritonserver" in readme
    assert "--model-control-mode=explicit" in readme
    if any(e.get("flavour") == "tensorrt_rtx" for e in manifest.get("engines") or []):
        assert any("TensorRT-RTX engine" in line for line in repository.left_out)


def test_verify_export_finds_a_changed_or_planted_file(repository, tmp_path):
    from medge.serve.triton import verify_export

    repo = tmp_path / "repo"
    shutil.copytree(repository.repository, repo)
    model = repo / "medge_demo_lesion_fp32_net_medge" / "1" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx changed since the export"):
        verify_export(repo)
    shutil.rmtree(repo)
    shutil.copytree(repository.repository, repo)
    (repo / "medge_demo_lesion_fp32" / "1" / "model.py").write_text("print('planted')\n")
    with pytest.raises(BundleError, match="was not written by the export"):
        verify_export(repo)


def test_a_tampered_bundle_is_refused_before_anything_is_written(demo_bundle, tmp_path):
    from medge.serve.triton import export_triton

    bundle = _copy_bundle(demo_bundle, tmp_path)
    graph = bundle / "models" / "model.fp32.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 1
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.fp32.onnx"):
        export_triton(bundle, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "copy.medge"] == []  # no staging folder left


def test_trusted_key_needs_a_signature(demo_bundle, tmp_path):
    pytest.importorskip("cryptography")
    from medge.bundle import generate_signing_key
    from medge.serve.triton import export_triton

    generate_signing_key(tmp_path / "key.pem", tmp_path / "key.pub.pem")
    with pytest.raises(SignatureError):
        export_triton(demo_bundle.bundle_path, tmp_path / "repo", trusted_key=tmp_path / "key.pub.pem")
    assert not (tmp_path / "repo").exists()


def test_failed_or_unmeasured_gates_are_left_out_or_refused(demo_bundle, tmp_path):
    from medge.serve.triton import export_triton

    bundle = _copy_bundle(demo_bundle, tmp_path)

    def fail_int8(manifest):
        manifest["gates"]["verdicts"]["int8"] = {"verdict": "failed", "reasons": ["top-1 agreement 97.00% < 99.00%"]}
        manifest["gates"]["verdicts"].pop("fp16")  # no verdict: "not measured"

    _edit_manifest(bundle, fail_int8)
    result = export_triton(bundle, tmp_path / "default")
    assert set(result.ensembles) == {"fp32", "int8-ort"}
    assert any(line.startswith("int8: left out: it failed its accuracy gates") and "97.00%" in line
               for line in result.left_out)
    assert any(line.startswith("fp16: left out: it was not measured") for line in result.left_out)
    with pytest.raises(MedgeError, match="int8 graph failed its accuracy gates.*--allow-failed-gates"):
        export_triton(bundle, tmp_path / "refused", precisions=["int8"])
    assert not (tmp_path / "refused").exists()
    with pytest.raises(MedgeError, match="needs --precision"):
        export_triton(bundle, tmp_path / "refused", allow_failed_gates=True)
    allowed = export_triton(bundle, tmp_path / "allowed", precisions=["int8"], allow_failed_gates=True)
    assert set(allowed.ensembles) == {"int8"}


def test_tensorrt_plans_per_compute_capability_and_rtx_left_out(demo_bundle, tmp_path):
    from medge.serve.triton import export_triton

    bundle = _copy_bundle(demo_bundle, tmp_path)
    _add_fake_engines(bundle)
    result = export_triton(bundle, tmp_path / "gpu", kind="gpu", precisions=["int8"])
    repo = result.repository
    config = _config(repo, "medge_demo_lesion_int8_net_tensorrt")
    assert 'platform: "tensorrt_plan"' in config and "kind: KIND_GPU" in config
    assert 'key: "8.6"\n  value: "model_sm86.plan"' in config and 'key: "9.0"\n  value: "model_sm90.plan"' in config
    record = json.loads((repo / "medge_demo_lesion_int8_net_tensorrt" / "1" / "tensorrt.json").read_text())
    assert record["tensorrt_version"] == "10.13.0" and set(record["plans"]) == {"8.6", "9.0"}
    assert (repo / "medge_demo_lesion_int8_net_tensorrt" / "1" / "model_sm90.plan").read_bytes() == \
        b"fake tensorrt plan 9.0"
    assert "medge_demo_lesion_int8_net_tensorrt" in _config(repo, result.ensembles["int8"])  # gpu: TensorRT
    assert "kind: KIND_GPU" in _config(repo, "medge_demo_lesion_preprocess")
    assert any("TensorRT-RTX engine engines/rtx_int8.engine left out" in line for line in result.left_out)
    cpu = export_triton(bundle, tmp_path / "cpu", precisions=["int8"])
    assert "net_onnxruntime" in _config(cpu.repository, cpu.ensembles["int8"])  # cpu: ONNX Runtime


def test_cli_exports_and_refuses_with_exit_2(demo_bundle, tmp_path, capsys):
    from medge.cli.main import main

    assert main(["export-triton", str(demo_bundle.bundle_path), "-o", str(tmp_path / "repo"),
                 "--precision", "int8-ort", "--name", "lesion"]) == 0
    out = capsys.readouterr().out
    assert "lesion_int8_ort_medge" in out and (tmp_path / "repo" / "lesion_int8_ort" / "config.pbtxt").is_file()
    assert main(["export-triton", str(demo_bundle.bundle_path), "-o", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty; pass --overwrite" in err and "Traceback" not in err
    assert main(["export-triton", str(demo_bundle.bundle_path), "-o", str(tmp_path / "x"), "--name", "a-b"]) == 2
    assert "letters, digits and '_'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- served by Triton

_PROBE = textwrap.dedent('''
    import json, sys, threading
    from medge.errors import MedgeError
    from medge.serve.triton import TritonDicomClient

    job = json.load(sys.stdin)
    files = {name: open(path, "rb").read() for name, path in job["files"].items()}
    answers = []
    for task in job["tasks"]:
        url = job["urls"][task["protocol"]]
        if task["op"] == "stats":
            with TritonDicomClient(url, task["protocol"]) as client:
                answers.append({m: client.statistics(m) for m in task["models"]})
            continue
        names = task["files"]
        results = [None] * len(names)

        def work(worker):
            with TritonDicomClient(url, task["protocol"]) as client:
                for i in range(worker, len(names), task.get("threads", 1)):
                    try:
                        out = client.infer(task["model"], [files[names[i]]])
                        results[i] = {"scores": out["SCORES"][0].tolist(), "label": out["LABEL"][0][0].decode(),
                                      "logits": out["logits"][0].tolist()}
                    except MedgeError as exc:
                        results[i] = {"error": str(exc)}

        threads = [threading.Thread(target=work, args=(w,)) for w in range(task.get("threads", 1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        answers.append(results)
    json.dump(answers, sys.stdout)
''')


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    from medge.serve.triton import serving_environment

    try:
        return serving_environment(log=lambda line: print(line, file=sys.stderr))
    except MedgeError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"cannot create the Triton serving environment here: {exc}")


@pytest.fixture(scope="module")
def dicoms(tmp_path_factory):
    """Eight demo CT slices, a CR radiograph (outside the CT model's envelope) and two damaged files."""
    from medge.demo import write_demo_dicoms
    from medge.synthetic import monochrome1_cr

    folder = tmp_path_factory.mktemp("dicoms")
    files, _ = write_demo_dicoms(folder / "ct", "validation", 8)
    monochrome1_cr().save_as(folder / "cr.dcm", enforce_file_format=True)
    data = files[0].read_bytes()
    (folder / "truncated.dcm").write_bytes(data[: len(data) // 3])
    (folder / "not_dicom.dcm").write_bytes(b"this is not a DICOM file" * 10)
    named = {f"ct{i}": str(p) for i, p in enumerate(files)}
    named.update(cr=str(folder / "cr.dcm"), truncated=str(folder / "truncated.dcm"),
                 not_dicom=str(folder / "not_dicom.dcm"))
    return named


@pytest.fixture(scope="module")
def server(serving, repository, tmp_path_factory):
    from medge.serve.triton import TritonServer

    started = time.monotonic()
    triton = TritonServer(repository.repository, serving, models=list(repository.medge_ensembles.values()),
                          log_path=tmp_path_factory.mktemp("server") / "server.log")
    triton.start()
    triton.startup_s = time.monotonic() - started
    try:
        yield triton
    finally:
        triton.stop()


def _probe(serving, server, files, tasks):
    job = {"urls": {"http": server.http_url, "grpc": server.grpc_url}, "files": files, "tasks": tasks}
    done = subprocess.run([str(serving.python), "-c", _PROBE], input=json.dumps(job), capture_output=True, text=True,
                          env=serving.environ(), cwd=str(Path(server.log_path).parent), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:] + "\n--- server log ---\n" + server.log()[-3000:]
    return json.loads(done.stdout)


def _reference(bundle_path, graph, paths):
    """medge.load's scores for ``graph`` on ``paths`` (in-process, ONNX Runtime on the CPU).

    medge.load chooses the graph from the precision (int8 -> the ONNX-Runtime-placed int8-ort on a CPU);
    the TensorRT-placed ``int8`` graph is run through the same Model pipeline by hand.
    """
    import medge
    from medge.bundle import Bundle
    from medge.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from medge.runtime.envelope import Envelope, EnvelopeCheck
    from medge.runtime.model import BackendChoice, Model
    from medge.tasks import task_from_manifest

    if graph != "int8":
        model = medge.load(bundle_path, backend="onnxruntime", device="cpu",
                           precision={"int8-ort": "int8"}.get(graph, graph))
        assert model.backend.graph == graph
    else:
        bundle = Bundle.open(bundle_path)
        m = bundle.manifest
        backend = OnnxRuntimeBackend(bundle.read_verified(m["graphs"]["int8"]["file"]), precision="int8",
                                     max_batch=int(m["profile"]["max"]), providers=["CPUExecutionProvider"])
        model = Model(bundle, backend, BackendChoice("onnxruntime", "int8", "int8", "cpu", "test", "", ()),
                      task_from_manifest(m), EnvelopeCheck(Envelope.from_manifest(m["envelope"]), "enforce"))
    with model:
        return [p for p in model.predict_batch(paths)]


@pytest.mark.slow  # the serving environment (pip, ~30 s cold) and a server start
def test_each_ensemble_returns_medge_load_scores_over_http_and_grpc(serving, server, repository, dicoms,
                                                                     demo_bundle):
    cts = sorted(name for name in dicoms if name.startswith("ct"))
    graphs = list(repository.medge_ensembles)
    tasks = [{"op": "infer", "protocol": protocol, "model": repository.medge_ensembles[graph], "files": cts}
             for protocol in ("http", "grpc") for graph in graphs]
    answers = iter(_probe(serving, server, dicoms, tasks))
    for protocol in ("http", "grpc"):
        for graph in graphs:
            expected = _reference(demo_bundle.bundle_path, graph, [dicoms[n] for n in cts])
            got = next(answers)
            for name, answer, prediction in zip(cts, got, expected):
                assert "error" not in answer, (protocol, graph, name, answer)
                np.testing.assert_allclose(answer["scores"], prediction.scores, rtol=1e-5, atol=1e-6,
                                           err_msg=f"{protocol} {graph} {name}")
                assert answer["label"] == prediction.label


@pytest.mark.slow  # the serving environment (pip, ~30 s cold) and a server start
def test_a_bad_dicom_fails_only_its_own_request_with_medges_message(serving, server, repository, dicoms):
    import medge

    order = ["ct0", "not_dicom", "ct1", "truncated", "cr", "ct2", "ct3", "ct4"]
    model = repository.medge_ensembles["fp32"]
    tasks = [{"op": "infer", "protocol": p, "model": model, "files": order, "threads": 4} for p in ("http", "grpc")]
    for answers in _probe(serving, server, dicoms, tasks):
        for name, answer in zip(order, answers):
            if name.startswith("ct"):
                assert "scores" in answer, (name, answer)
                continue
            assert "error" in answer, (name, answer)
            if name == "cr":
                assert "input outside the model's validated envelope" in answer["error"]
                assert "modality CR; this model was validated on CT" in answer["error"]
            else:
                with pytest.raises(MedgeError) as raised:
                    medge.read_dicom(Path(dicoms[name]).read_bytes())
                assert str(raised.value) in answer["error"]


@pytest.mark.slow  # the serving environment (pip, ~30 s cold) and a server start
def test_concurrent_requests_are_batched(serving, server, repository, dicoms):
    model = repository.medge_ensembles["int8-ort"]
    network = "medge_demo_lesion_int8_ort_net_medge"
    cts = sorted(name for name in dicoms if name.startswith("ct")) * 6  # 48 requests
    before, answers, after = _probe(serving, server, dicoms, [
        {"op": "stats", "protocol": "grpc", "models": [network]},
        {"op": "infer", "protocol": "grpc", "model": model, "files": cts, "threads": 8},
        {"op": "stats", "protocol": "grpc", "models": [network]}])
    assert all("scores" in a for a in answers)
    inferences = after[network]["inference_count"] - before[network]["inference_count"]
    executions = after[network]["execution_count"] - before[network]["execution_count"]
    assert inferences == len(cts)
    assert executions < inferences, f"{inferences} requests ran as {executions} executions: nothing was batched"


@pytest.mark.slow  # the serving environment (pip, ~30 s cold) and a server start
def test_metrics_endpoint_answers(server):
    with urllib.request.urlopen(server.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    assert reply.status == 200 and "nv_inference_request_success" in text


@pytest.mark.slow  # the serving environment (pip, ~30 s cold) and a server start
def test_configs_match_tritons_own_schema(serving, repository, demo_bundle, tmp_path):
    """Every config.pbtxt, including the onnxruntime and tensorrt_plan ones this server cannot run."""
    from medge.serve.triton import export_triton

    bundle = _copy_bundle(demo_bundle, tmp_path)
    _add_fake_engines(bundle)
    gpu = export_triton(bundle, tmp_path / "gpu", kind="gpu", instances=2, threads=2, execution_env="$$X/env.tgz")
    configs = sorted(str(p) for repo in (repository.repository, gpu.repository) for p in repo.glob("*/config.pbtxt"))
    assert any("net_tensorrt" in c for c in configs) and any("net_onnxruntime" in c for c in configs)
    check = textwrap.dedent('''
        import json, sys
        from medge.serve.triton import check_config
        for path in json.load(sys.stdin):
            config = check_config(open(path).read())
            assert config.name == path.split("/")[-2], path
        print("ok")
    ''')
    done = subprocess.run([str(serving.python), "-c", check], input=json.dumps(configs), capture_output=True,
                          text=True, env=serving.environ(), cwd=str(tmp_path), timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    # and the checker does catch a typo
    broken = tmp_path / "broken.pbtxt"
    broken.write_text(Path(configs[0]).read_text().replace("max_batch_size", "max_batch_sise"))
    done = subprocess.run([str(serving.python), "-c", check], input=json.dumps([str(broken)]), capture_output=True,
                          text=True, env=serving.environ(), cwd=str(tmp_path), timeout=120)
    assert done.returncode != 0 and "max_batch_sise" in done.stderr


@pytest.mark.slow  # the serving environment (pip, ~30 s cold) and a server start
def test_a_changed_graph_is_refused_when_triton_loads_it(serving, repository, tmp_path):
    """Triton checks nothing: the medge network checks its graph's SHA-256 before serving."""
    from medge.serve.triton import TritonServer

    repo = tmp_path / "repo"
    shutil.copytree(repository.repository, repo)
    graph = repo / "medge_demo_lesion_fp32_net_medge" / "1" / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 1
    graph.write_bytes(bytes(data))
    triton = TritonServer(repo, serving, models=[repository.medge_ensembles["fp32"]], log_path=tmp_path / "log")
    try:
        with pytest.raises(MedgeError, match="before it was ready"):
            triton.start()
    finally:
        triton.stop()
    assert "is not the fp32 graph that medge exported (SHA-256 differs)" in triton.log()


@pytest.mark.slow  # the serving environment (pip, ~30 s cold) and a server start
def test_the_server_stops_cleanly(server):
    """Last in this file: SIGTERM stops the server and its python stubs, with exit status 0."""
    started = time.monotonic()
    status = server.stop()
    assert status == 0, server.log()[-3000:]
    assert time.monotonic() - started < 30
    assert "successfully unloaded" in server.log()
    with pytest.raises(ProcessLookupError):  # no stub left behind in the server's process group
        os.killpg(server.process.pid, 0)
