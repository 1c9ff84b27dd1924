from training import bench_memory


def test_memory_benchmark_prints_memory_and_live_tensors_after_every_tenth_run(capsys):
    assert bench_memory.main(["--runs", "20", "--samples", "2", "--steps", "4", "--threads", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 10, 20]
    assert all(float(r[1]) > 0 for r in rows)
    assert int(rows[1][2]) == int(rows[2][2])  # a run that kept anchors or spans would add tensors each time
