"""Every bad command line ends in one line that names the argument and what is allowed, exit code 2, no
traceback, and before any work (no output folder made, nothing written)."""
import subprocess
import sys

import pytest
import torch

from loldu_triton.tools.cli import main

CUDA = torch.cuda.is_available()

# (argv, the argument the one line names)
BAD = [
    (["bench", "--shapes", "256x256"], "--shapes"),
    (["bench", "--shapes", "abc"], "--shapes"),
    (["bench", "--shapes", "0x8x8"], "--shapes"),
    (["bench", "--ranks", "0"], "--ranks"),
    (["bench", "--ranks", "abc"], "--ranks"),
    (["bench", "--ranks", "16,"], "--ranks"),
    (["bench", "--shapes", "64x32x32", "--ranks", "64"], "--ranks"),  # above the layer's min(K, N)
    (["bench", "--shapes", "16x32x24,64x32x32", "--ranks", "30"], "--ranks"),  # above the first shape's only
    (["bench", "--adapter-counts", "0"], "--adapter-counts"),
    (["bench", "--adapter-counts", "-3"], "--adapter-counts"),
    (["bench", "--adapter-counts", "1,10", "--ranks", "4,8"], "--ranks"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--repeats", "x"], "--repeats"),
    (["bench", "--device", "tpu"], "--device"),
    (["bench", "--dtype", "float64"], "--dtype"),
    (["bench", "--methods", "linear,nope"], "--methods"),
    (["bench", "--methods", ""], "--methods"),
    (["bench", "--gpu", "V100"], "--gpu"),
    (["bench", "--model", "gpt2"], "--model"),
    (["bench", "--model", "minilm", "--batch", "0x0"], "--batch"),
    (["bench", "--model", "minilm", "--batch", "16"], "--batch"),
    (["bench", "--batch", "2x8"], "--batch"),  # read only by --model
    (["bench", "--model", "minilm", "--ranks", "full"], "--ranks"),
    (["bench", "--model", "llama", "--ranks", "1024"], "--ranks"),
    (["bench", "--model", "llama", "--methods", "linear"], "--methods"),
    (["bench", "--model", "llama", "--shapes", "8x8x8"], "--shapes"),
    (["bench", "--model", "llama", "--inference"], "--inference"),
    (["bench", "--inference", "--gpu", "H100"], "--gpu"),
    (["bench", "--inference", "--device", "cuda"], "--device"),
    (["bench", "--no-memory"], "--no-memory"),
    (["demo", "--epochs", "-5"], "--epochs"),
    (["demo", "--epochs", "0"], "--epochs"),
    (["demo", "--pretrain-epochs", "1.5"], "--pretrain-epochs"),
    (["demo", "--seed", "-1"], "--seed"),
    (["demo", "--device", "tpu"], "--device"),
    (["compile-check", "--arch", "70"], "--arch"),
    (["compile-check", "--arch", "abc"], "--arch"),
    (["compile-check", "--jobs", "0"], "--jobs"),
    (["compile-check", "--scope", "all"], "--scope"),
    (["compile-check", "--quick", "--scope", "full"], "--quick"),
]
if not CUDA:
    BAD += [(["bench", "--device", "cuda"], "--device"), (["demo", "--device", "cuda:0"], "--device")]
if not CUDA:
    BAD.append((["bench", "--methods", "loldu_torch"], "--methods"))  # the PyTorch path of a GPU run


def error_lines(text: str):
    """What argparse printed besides its usage (which starts with "usage:" and goes on indented)."""
    return [line for line in text.splitlines() if line and not line.startswith(("usage:", " "))]


def assert_one_line(capsys, argv, argument):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, (argv, out, err)
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in out + err, (argv, err)
    assert lines[0].startswith(f"loldu-triton {argv[0]}: error: argument {argument}"), (argv, lines)
    assert not out, (argv, out)


@pytest.mark.parametrize("argv,argument", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_argument_is_one_line_exit_2_and_no_work(tmp_path, capsys, argv, argument):
    out = tmp_path / "out"
    if argv[0] != "compile-check":
        argv = argv + ["--out", str(out)]
    assert_one_line(capsys, argv, argument)
    assert not out.exists()  # checked before any work: not even the output folder


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_an_output_folder_that_cannot_be_written_is_refused_up_front(tmp_path, capsys, command):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert_one_line(capsys, [command, "--out", str(a_file)], "--out")  # a file, not a folder
    assert_one_line(capsys, [command, "--out", str(a_file / "below")], "--out")  # under a file
    assert_one_line(capsys, [command, "--out", ""], "--out")
    if sys.platform.startswith("linux"):  # refused even to root: /proc holds no new folders
        assert_one_line(capsys, [command, "--out", "/proc/unwritable"], "--out")
    assert_one_line(capsys, ["compile-check", "--json", str(a_file / "x.json")], "--json")
    assert_one_line(capsys, ["compile-check", "--json", str(tmp_path)], "--json")  # a folder, not a file


@pytest.mark.parametrize("argv", [["bench", "--ranks", "0"], ["demo", "--epochs", "-5"], ["bench", "--shapes", "abc"]])
def test_the_console_command_prints_no_traceback(argv):
    out = subprocess.run([sys.executable, "-m", "loldu_triton.tools.cli", *argv], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(error_lines(out.stderr)) == 1 and argv[1] in error_lines(out.stderr)[0]
