"""The flows' parts on their own: incoming merge and recovery, the workspace lock, the git commit,
notifications and the reading of DVC failures. Seconds, no pipeline run."""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path

import pytest
from fixtures_prefect import sh

from cnnops.config import OrchestrateParams
from cnnops.errors import CnnopsError, ConfigError, DataError
from pipelines import dvc_cli, gitops, notify
from pipelines.workspace import (
    MERGE_FILE,
    TMP_SUFFIX,
    WorkspaceBusy,
    clear_incoming,
    incoming_folder,
    merge_incoming,
    recover,
    rollback_merge,
    workspace_lock,
)

log = logging.getLogger("test")


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_merge_copies_new_files_and_is_idempotent(tmp_path: Path) -> None:
    incoming, data = tmp_path / "incoming", tmp_path / "data"
    write(data / "cat" / "old.png", b"old")
    write(incoming / "cat" / "new.png", b"new")
    write(incoming / "dog" / "d.png", b"dog")
    first = merge_incoming(tmp_path, incoming, data, log)
    assert sorted(p.name for p in first.copied) == ["d.png", "new.png"]
    assert (data / "dog" / "d.png").read_bytes() == b"dog"
    again = merge_incoming(tmp_path, incoming, data, log)  # as after a run killed before clear_incoming
    assert again.copied == [] and len(again.identical) == 2
    clear_incoming(tmp_path, again, incoming, log)
    assert list(incoming.iterdir()) == [], "files and emptied class folders are gone"
    assert not (tmp_path / MERGE_FILE).exists(), "versioned: nothing left to roll back"


def test_merge_refuses_a_name_clash_and_a_file_outside_a_class_folder(tmp_path: Path) -> None:
    incoming, data = tmp_path / "incoming", tmp_path / "data"
    write(data / "cat" / "a.png", b"one")
    write(incoming / "cat" / "a.png", b"two")
    write(incoming / "cat" / "b.png", b"fine")
    with pytest.raises(DataError, match=r"cat/a.png already exists with other content; rename"):
        merge_incoming(tmp_path, incoming, data, log)
    assert not (data / "cat" / "b.png").exists(), "checked before anything is copied"
    (incoming / "cat" / "a.png").unlink()
    write(incoming / "loose.png", b"x")
    with pytest.raises(DataError, match=r"loose.png: incoming images must sit in a class folder"):
        merge_incoming(tmp_path, incoming, data, log)
    assert (data / "cat" / "a.png").read_bytes() == b"one"


def test_merge_refuses_links_and_anything_but_regular_files(tmp_path: Path) -> None:
    incoming, data, secret = tmp_path / "incoming", tmp_path / "data", tmp_path / "secret.key"
    secret.write_bytes(b"private")
    write(incoming / "cat" / "fine.png", b"png")
    (incoming / "cat" / "link.png").symlink_to(secret)
    (incoming / "linked").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(incoming / "cat" / "pipe.png")
    with pytest.raises(DataError, match=r"nothing merged, as incoming images must be regular files") as info:
        merge_incoming(tmp_path, incoming, data, log)
    message = str(info.value)
    assert f"{incoming / 'cat' / 'link.png'} (a symbolic link to {secret})" in message
    assert f"{incoming / 'linked'} (a symbolic link to {tmp_path})" in message
    assert f"{incoming / 'cat' / 'pipe.png'} (a named pipe)" in message and "cp --dereference" in message
    assert not data.exists(), "nothing was copied"
    assert secret.read_bytes() == b"private" and (incoming / "cat" / "link.png").is_symlink()


def test_an_unversioned_merge_is_rolled_back_and_a_changed_copy_kept(tmp_path: Path, caplog) -> None:
    incoming, data = tmp_path / "incoming", tmp_path / "data"
    write(data / "cat" / "old.png", b"old")
    write(incoming / "cat" / "new.png", b"new")
    write(incoming / "dog" / "d.png", b"dog")
    write(incoming / "eel" / "e.png", b"eel")
    merge_incoming(tmp_path, incoming, data, log)
    (data / "eel" / "e.png").write_bytes(b"fixed by hand")
    with caplog.at_level(logging.WARNING):
        removed = rollback_merge(tmp_path, data, log)
    assert sorted(p.name for p in removed) == ["d.png", "new.png"]
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png")) == ["cat/old.png", "eel/e.png"]
    assert not (data / "dog").exists(), "the class folder the merge made is gone"
    assert "keeping" in caplog.text and "eel/e.png" in caplog.text
    assert len(list(incoming.rglob("*.png"))) == 3, "the originals stay"
    assert rollback_merge(tmp_path, data, log) == [], "nothing noted any more"


def test_hidden_incoming_files_are_left_with_a_warning(tmp_path: Path, caplog) -> None:
    incoming, data = tmp_path / "incoming", tmp_path / "data"
    write(incoming / ".DS_Store", b"x")
    with caplog.at_level(logging.WARNING):
        assert merge_incoming(tmp_path, incoming, data, log).sources == []
    assert "not merging" in caplog.text and ".DS_Store" in caplog.text


def test_recover_removes_what_an_interrupted_merge_left(tmp_path: Path) -> None:
    incoming, data = tmp_path / "incoming", tmp_path / "data"
    leftover = write(data / "cat" / f".a.png{TMP_SUFFIX}", b"half")
    kept = write(data / "cat" / "b.png", b"whole")
    write(incoming / "cat" / "c.png", b"merged, never versioned")
    merge_incoming(tmp_path, incoming, data, log)  # then the run was killed
    recover(tmp_path, data, log)
    assert not leftover.exists() and kept.exists()
    assert not (data / "cat" / "c.png").exists() and (incoming / "cat" / "c.png").exists()


@pytest.mark.parametrize(("incoming", "where"), [("data", "is"), ("data/cat", "is inside"), (".", "holds")])
def test_the_incoming_folder_is_never_the_data_folder(tmp_path: Path, incoming: str, where: str) -> None:
    (tmp_path / "data" / "cat").mkdir(parents=True)
    with pytest.raises(
        ConfigError, match=rf"orchestrate.incoming = '{re.escape(incoming)}' .* {where} the data"
    ):
        incoming_folder(tmp_path, incoming, tmp_path / "data")


def test_the_incoming_folder_is_checked_where_it_really_is(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "data", target_is_directory=True)
    with pytest.raises(ConfigError, match=r"orchestrate.incoming = 'alias' .* is the data folder"):
        incoming_folder(tmp_path, "alias", tmp_path / "data")
    assert incoming_folder(tmp_path, "incoming", tmp_path / "data") == tmp_path / "incoming"
    assert incoming_folder(tmp_path, None, tmp_path / "data") is None


def test_the_workspace_lock_names_its_holder(tmp_path: Path) -> None:
    (tmp_path / ".dvc").mkdir()
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with workspace_lock(tmp_path, 0, "run-a", log):
            held.set()
            done.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        busy = r"is busy: pid \d+ \(flow run run-a, since .*this run does nothing"
        with pytest.raises(WorkspaceBusy, match=busy):
            enter(tmp_path, 0)
        with pytest.raises(WorkspaceBusy, match=r"stayed busy for 0 s: pid \d+ \(flow run run-a"):
            enter(tmp_path, 0.2)
    finally:
        done.set()
        holder.join()
    enter(tmp_path, 0)  # free again once the holder left


def enter(root: Path, timeout: float) -> None:
    with workspace_lock(root, timeout, "run-b", log):
        pass


def test_commit_to_branch_leaves_the_checkout_alone(tmp_path: Path) -> None:
    sh(tmp_path, "git", "init", "-q", "-b", "main")
    write(tmp_path / "code.py", b"v1")
    write(tmp_path / "data.dvc", b"md5: 1")
    sh(tmp_path, "git", "add", "-A")
    sh(tmp_path, "git", "commit", "-q", "-m", "one")
    head = sh(tmp_path, "git", "rev-parse", "HEAD").strip()
    write(tmp_path / "data.dvc", b"md5: 2")
    write(tmp_path / "code.py", b"v2 staged by the user")
    sh(tmp_path, "git", "add", "code.py")
    first = gitops.commit_to_branch(tmp_path, "cnnops/retrain", ["data.dvc"], "retrain 1")
    assert sh(tmp_path, "git", "show", "cnnops/retrain:data.dvc") == "md5: 2"
    assert sh(tmp_path, "git", "show", "cnnops/retrain:code.py") == "v1", "HEAD's tree, not the index"
    assert sh(tmp_path, "git", "rev-parse", "HEAD").strip() == head
    assert sh(tmp_path, "git", "status", "--porcelain").splitlines() == ["M  code.py", " M data.dvc"]
    write(tmp_path / "data.dvc", b"md5: 3")
    second = gitops.commit_to_branch(tmp_path, "cnnops/retrain", ["data.dvc"], "retrain 2")
    assert sh(tmp_path, "git", "rev-parse", f"{second}^").strip() == first
    with pytest.raises(CnnopsError, match="git check-ref-format"):
        gitops.commit_to_branch(tmp_path, "bad..name", ["data.dvc"], "x")


def test_notifications_go_only_where_configured(webhook, caplog) -> None:
    url, messages = webhook
    messages.clear()
    nowhere = OrchestrateParams.from_defaults(notify_webhook=None, notify_block=None)
    assert notify.send(nowhere, "failure", "s", "b", log) == []
    assert messages == []
    hook = nowhere.model_copy(update={"notify_webhook": url})
    assert notify.send(hook, "champion", "subject", "body", log) == ["webhook"]
    assert messages == [{"event": "champion", "subject": "subject", "text": "subject\nbody"}]
    with caplog.at_level(logging.DEBUG):
        dead = nowhere.model_copy(update={"notify_webhook": "http://127.0.0.1:9/hooks/T000/sekret?key=k3y"})
        assert notify.send(dead, "failure", "s", "b", log) == []
    assert "webhook http://127.0.0.1:9/*** failed: ConnectError" in caplog.text
    assert not {"T000", "sekret", "k3y"} & set(re.split(r"\W+", caplog.text)), "the URL is the token"


def test_a_prefect_notification_block_is_used_by_name(webhook, prefect_harness) -> None:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    url, messages = webhook
    block = CustomWebhookNotificationBlock(
        name="test-hook", url=url, json_data={"event": "block", "text": "{{subject}}: {{body}}"}
    )
    block.allow_private_urls = True
    block.save("cnnops-test", overwrite=True)
    messages.clear()
    orchestrate = OrchestrateParams.from_defaults(
        notify_webhook=None, notify_block="custom-webhook/cnnops-test"
    )
    assert notify.send(orchestrate, "champion", "new champion", "v3", log) == [
        "block custom-webhook/cnnops-test"
    ]
    assert messages == [{"event": "block", "text": "new champion: v3"}]


def test_only_transient_dvc_failures_are_retryable() -> None:
    busy = [
        "ERROR: failed to reproduce 'train': '/w/models' is busy, it is being blocked by:",
        "  (PID 7): dvc",
        "",
        "If there are no processes with such PIDs, you can manually remove '/w/.dvc/tmp/rwlock' and try "
        "again.",
    ]
    assert isinstance(dvc_cli.failure("stage 'train'", 255, busy), dvc_cli.TransientDvcError)
    locked = [
        "ERROR: Unable to acquire lock. Most likely another DVC process is running or was terminated "
        "abruptly. Check the page <https://dvc.org/doc/user-guide/troubleshooting#lock-issue> for other "
        "possible reasons and to learn how to resolve this."
    ]
    assert isinstance(dvc_cli.failure("dvc add data", 255, locked), dvc_cli.TransientDvcError)
    down = [  # cnnops said so by its exit status (cnnops.errors.TRANSIENT_EXIT)
        "cnnops train: error: ConnectionError: Max retries exceeded (a server or database did not answer...)",
        "ERROR: failed to reproduce 'train': failed to run: cnnops train prepared, exited with 75",
    ]
    assert isinstance(dvc_cli.failure("stage 'train'", 255, down), dvc_cli.TransientDvcError)
    assert type(dvc_cli.failure("stage 'train'", 1, locked)) is dvc_cli.DvcCommandError, "not DVC's error"
    invalid = [
        "cnnops validate: error: 1 error-level check(s) failed on data:",
        "- decodes: data/0/x.png is not an image",
        "ERROR: failed to reproduce 'validate': failed to run: cnnops validate ..., exited with 1",
    ]
    error = dvc_cli.failure("stage 'validate'", 255, invalid)
    assert type(error) is dvc_cli.DvcCommandError
    assert str(error) == (
        "stage 'validate' failed (exit 255): cnnops validate: error: 1 error-level check(s) failed on data: "
        "- decodes: data/0/x.png is not an image"
    )


def test_file_names_that_read_like_a_transient_error_are_not_retried() -> None:
    """User file names in a stage's output (even with a newline in them) never make a failure transient."""
    named = [
        "cnnops validate: error: 1 error-level check(s) failed on data:",
        "- decodes: data/0/Connection refused.png, data/0/Max retries exceeded.png, data/0/x is busy, it is "
        "being blocked by.png, data/0/database is locked.png",
        "ERROR: Unable to acquire lock. Most likely another DVC process is running (a forged line).png",
        "ERROR: failed to reproduce 'validate': failed to run: cnnops validate ..., exited with 1",
    ]
    assert type(dvc_cli.failure("stage 'validate'", 255, named)) is dvc_cli.DvcCommandError
    forged_in_dvcs_message = [
        "ERROR: failed to reproduce 'validate': output 'data/0/a",
        "ERROR: failed to reproduce 'x': failed to run: y, exited with 75",
        "' does not exist",
    ]
    assert type(dvc_cli.failure("stage 'validate'", 255, forged_in_dvcs_message)) is dvc_cli.DvcCommandError


def test_dvc_failure_without_a_stage_error_names_dvcs_error() -> None:
    crash = ["Traceback (most recent call last):", "ValueError: boom", "ERROR: failed to reproduce 'train'"]
    assert str(dvc_cli.failure("stage 'train'", 255, crash)).endswith(
        "ERROR: failed to reproduce 'train' (output before it: ValueError: boom)"
    )
