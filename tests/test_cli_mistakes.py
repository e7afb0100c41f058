"""Command-line and card mistakes that once ended in a traceback (or in a silent success): each is now one
line that names the file or flag and the fix."""

from __future__ import annotations

import argparse
import socket
import threading

import pytest

from pipeline.cli import main


def _one_line_error(capsys, argv, code=2) -> str:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    return err


def test_a_card_that_is_not_utf8_names_the_file(tmp_path, capsys):
    card = tmp_path / "latin1.yaml"
    card.write_bytes("name: caf\xe9\n".encode("latin-1"))
    err = _one_line_error(capsys, ["engine", "--model", str(card)])
    assert f"card file {card} is not UTF-8 text (byte 9" in err and "save it as UTF-8" in err


@pytest.mark.parametrize("where", ["/proc/dms-build", "/sys/dms-build", "/dev/null/build"])
def test_a_build_dir_that_cannot_be_written_is_one_line(where, capsys):
    err = _one_line_error(capsys, ["engine", "--until", "prepare", "--build-dir", where])
    assert f"cannot use --build-dir {where}" in err and "name a writable directory" in err


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_ask_timeout_must_be_a_finite_positive_number(value, capsys):
    err = _one_line_error(capsys, ["ask", "hi", "--timeout", value])
    assert "--timeout" in err and value in err


@pytest.mark.parametrize("value", ["nan", "-0.5", "inf"])
def test_ask_temperature_must_be_finite_and_not_negative(value, capsys):
    err = _one_line_error(capsys, ["ask", "hi", "--temperature", value])
    assert "--temperature" in err and "a temperature (a finite number >= 0)" in err


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-5"])
def test_load_tool_refuses_durations_that_run_nothing(value, capsys):
    from pipeline.serve.load import main as load_main

    with pytest.raises(SystemExit) as exc:
        load_main(["--seconds", value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--seconds" in err and "a duration in seconds" in err
    assert "Traceback" not in err


def _stalling_server(first: bytes):
    """A real socket that answers the request's headers (and `first` body bytes), then says nothing."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    release = threading.Event()

    def serve():
        conn, _ = sock.accept()
        conn.recv(65536)
        conn.sendall(first)
        release.wait(30)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return sock, release


@pytest.mark.parametrize("stream", [True, False])
def test_ask_says_so_when_the_server_stalls_mid_reply(stream, capsys):
    from pipeline.serve.cli import ask_command

    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
    piece = b'data: {"text_output": "par", "model_name": "tensorrt_llm_bls"}\n\n'
    sock, release = _stalling_server(head + (piece if stream else b'{"text_output": '))
    try:
        url = f"127.0.0.1:{sock.getsockname()[1]}"
        args = argparse.Namespace(prompt="hi", url=url, protocol="http", stream=stream, max_tokens=4,
                                  temperature=0.0, timeout=1.0, model=None)  # fmt: skip
        assert ask_command(args) == 1
        err = capsys.readouterr().err
        assert "stopped answering: nothing for 1 s in the middle of the reply (--timeout)" in err
        assert "Traceback" not in err
    finally:
        release.set()
        sock.close()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is not json\n", "line 1: not JSON (Expecting value, column 1)"),
        (b'{"text": "ok"}\n{"text": broken\n', "line 2: not JSON"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "is not UTF-8 text; it must be JSONL"),
        (b"[1, 2]\n", "each record must be a JSON object"),
    ],
)
def test_retrofit_data_that_is_not_jsonl_names_the_file(tmp_path, content, message):
    from pipeline.dms.distill_data import read_records

    path = tmp_path / "traces.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        read_records(path)
    assert str(path) in str(err.value) and message in str(err.value)
