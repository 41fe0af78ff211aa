"""``dfm-stream alarms`` and ``dfm-stream scores`` print the streams as JSON lines."""

import json

from worker_helpers import push_frames, run_worker

from dfm_stream.cli import main


def test_alarms_and_scores_print_json_lines(redis_client, redis_url, artifact, capsys, tmp_path):
    push_frames(redis_client, "cam1", artifact.good[:2] + artifact.defect[:1] + artifact.good[:5])
    run_worker(redis_url, artifact.path, cameras=["cam1"])
    capsys.readouterr()
    assert main(["alarms", "--redis", redis_url]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["type"] for e in events] == ["raised", "cleared"]
    assert events[0]["seq"] == 2 and 0 < events[0]["image_bytes"] <= 64 * 1024
    assert (
        main(["alarms", "--redis", redis_url, "--since", events[0]["id"], "--images", str(tmp_path / "img")])
        == 0
    )
    assert [json.loads(line)["type"] for line in capsys.readouterr().out.splitlines()] == ["cleared"]
    assert main(["alarms", "--redis", redis_url, "--images", str(tmp_path / "img")]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert (tmp_path / "img" / first["image_file"].rsplit("/", 1)[-1]).read_bytes()[:2] == b"\xff\xd8"
    assert main(["scores", "--redis", redis_url, "--camera", "cam1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [s["seq"] for s in lines] == list(range(8))
    assert main(["scores", "--redis", redis_url, "--camera", "cam1", "--count", "3"]) == 0
    assert [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()] == [5, 6, 7]
