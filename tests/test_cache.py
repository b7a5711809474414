"""The cache's build lock: concurrent builders of one entry build it once (test workers, several jobs on one box)."""

from __future__ import annotations

import threading
import time

from moon_rl.cache import atomic_dir, build_lock


def test_concurrent_builders_of_one_entry_build_it_once_and_all_find_it(tmp_path):
    final, built, found = tmp_path / "entry", [], []

    def build(name: int) -> None:
        with build_lock(final):  # flock: separate open()s conflict even between threads of one process
            if not (final / "done").exists():
                built.append(name)
                time.sleep(0.2)  # long enough for every other builder to be waiting
                with atomic_dir(final, replace=False) as tmp:
                    (tmp / "done").write_text(str(name))
        found.append((final / "done").read_text())

    threads = [threading.Thread(target=build, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(built) == 1, built  # without the lock every thread sees no entry and builds its own
    assert found == [str(built[0])] * 3
