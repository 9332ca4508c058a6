"""runtime.demo (the end of `make run`): a real server process, one Predict per task and '*'."""

from runtime.demo import main


def test_demo_round_trip_and_clean_shutdown(text_model_dir, capsys):
    assert main(["--model", str(text_model_dir), "--text", "a short test sentence"]) == 0
    out = capsys.readouterr().out
    assert "Predict(task='*')" in out
    assert "server drained and exited with code 0" in out
    assert out.count("Predict(task=") >= 3  # every task and '*'


def test_demo_reports_a_server_that_cannot_start(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing"), "--text", "x"]) == 1
    assert "runtime.demo: error: the server exited with code 2" in capsys.readouterr().err
