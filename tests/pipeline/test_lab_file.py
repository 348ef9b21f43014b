"""A lab file's matrix: models x profiles x schemes x runtimes (each profile's preferred one by default)."""

from __future__ import annotations

from pipeline.lab import jobs, load_lab
from tests.factories import make_result


def test_runtimes_default_to_each_profiles_own(tmp_path):
    lab = tmp_path / "lab.yaml"
    lab.write_text("name: gpu\nmodels: [digits-cnn]\nprofiles: [jetson-nano, raspberry-pi-4]\nschemes: [fp16]\n")
    assert [(j.device, j.config.runtime) for j in jobs(load_lab(lab))] == [
        ("jetson-nano", "onnxruntime-tensorrt"), ("raspberry-pi-4", "tvm")]


def test_a_lab_can_ask_for_several_runtimes(tmp_path):
    lab = tmp_path / "lab.yaml"
    lab.write_text("name: gpu\nmodels: [digits-cnn]\nprofiles: [jetson-nano]\nschemes: [fp32, fp16]\n"
                   "runtimes: [onnxruntime, onnxruntime-tensorrt]\n")
    assert {(j.config.quant.scheme, j.config.runtime) for j in jobs(load_lab(lab))} == {
        (s, r) for s in ("fp32", "fp16") for r in ("onnxruntime", "onnxruntime-tensorrt")}


def test_each_runtime_keeps_its_own_history():
    """TVM on the CPU keeps the plain scheme (the series results had before runtimes existed); anything else is its
    own series, so TensorRT fp16 and TVM fp16 on one board never judge each other."""
    tvm = make_result(1, scheme="fp16")
    assert tvm.series == "fp16"
    trt = tvm.model_copy(update={"runtime": "onnxruntime-tensorrt 1.11.0", "unit": "GPU"})
    assert trt.series == "fp16 · onnxruntime-tensorrt (GPU)"


def test_a_lab_model_takes_a_users_batch_coco_labels_and_reference(tmp_path):
    lab = tmp_path / "lab.yaml"
    lab.write_text("name: own\nprofiles: [local]\nmodels:\n"
                   "  - {model: ./det.onnx, eval_data: coco/instances.json, decode: yolov8, batch: 4, images: coco}\n"
                   "  - {model: ./qat.onnx, reference: ./fp32.onnx}\n")
    det, qat = (job.config for job in jobs(load_lab(lab)))
    assert (det.batch, det.decode, det.eval_data, det.images) == (
        4, "yolov8", str(tmp_path / "coco" / "instances.json"), str(tmp_path / "coco"))
    assert qat.reference == str(tmp_path / "fp32.onnx") and qat.batch is None


def test_two_profiles_for_one_board_share_its_queue(tmp_path):
    """The lab's Prefect limit was keyed by profile name: two profiles for one board measured at once on it."""
    for name, workdir in (("pi-a", "/home/pi/a"), ("pi-b", "/home/pi/b")):
        (tmp_path / f"{name}.yaml").write_text(
            f"extends: raspberry-pi-4\nname: {name}\nconnection:\n  transport: ssh\n  host: pi.lab\n  port: 2222\n"
            f"  user: pi\n  workdir: {workdir}\n")
    lab = tmp_path / "lab.yaml"
    lab.write_text("name: shared\nmodels: [digits-cnn]\nprofiles: [pi-a.yaml, pi-b.yaml, raspberry-pi-5]\n"
                   "schemes: [fp32]\n")
    boards = {job.device: job.board for job in jobs(load_lab(lab))}
    assert boards["pi-a"] == boards["pi-b"] == "pi@pi.lab:2222" != boards["raspberry-pi-5"]
