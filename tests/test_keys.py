"""Derived keys land in the slot of the key they serve, whatever braces the base key holds.

A script call may only touch one cluster slot, and the result key, the queue and the schedule
prefix are the user's names (task ids from a custom generator, queue names), so ``beside`` must
hold for every shape of name, not only for the polite ones.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from redis.crc import key_slot
from taskiq import TaskiqResult
from taskiq.depends.progress_tracker import TaskProgress, TaskState

from taskiq_redis import (
    RedisAsyncClusterResultBackend,
    RedisAsyncResultBackend,
    RedisAsyncSentinelResultBackend,
    keys,
)
from taskiq_redis.result_backend import BaseRedisResultBackend
from tests.servers import Topology

AWKWARD = ["job}1", "a{}b", "{}", "x{y}z", "", "}", "{", "}{", "{}{x}", "a{b", "{a}b}", "é}ü"]


def every_shape() -> list[str]:
    """Every string of up to four characters over braces and two letters, and some longer."""
    alphabet = "{}ab"
    shapes = ["".join(chars) for n in range(5) for chars in itertools.product(alphabet, repeat=n)]
    return [*shapes, *AWKWARD, "task-{user:42}-7", "{taskiq}", "taskiq", "prefix:{}:id"]


def slot_of(key: str) -> int:
    return key_slot(key.encode())


@pytest.mark.parametrize("suffix", [keys.PROGRESS_SUFFIX, keys.DEAD_LETTER_SUFFIX, "__index"])
def test_derived_key_shares_the_slot_of_its_base(suffix: str) -> None:
    shapes = every_shape() if suffix == keys.PROGRESS_SUFFIX else AWKWARD
    for base in shapes:
        derived = keys.beside(base, suffix)
        assert slot_of(derived) == slot_of(base), (base, derived)
        assert derived != base
        assert derived.startswith(base) or derived.startswith("{" + base + "}"), (base, derived)


@pytest.mark.parametrize("suffix", [keys.DEAD_LETTER_SUFFIX, keys.DELAYED_SUFFIX])
def test_the_base_of_a_derived_key_is_found_again(suffix: str) -> None:
    """The queue view finds dead-letter and delayed keys by SCAN and names their queue."""
    for base in [*AWKWARD, "taskiq", "{app}jobs", "q:1"]:
        found = keys.base_of(keys.beside(base, suffix), suffix)
        # ``x`` and ``{x}`` share their derived keys (one slot, one name): either is right.
        assert found is not None, base
        assert keys.beside(found, suffix) == keys.beside(base, suffix), (base, found)
        assert found == base or f"{{{found}}}" == base, (base, found)
    for key in ["taskiq", "plain:dead~x", ":dead~", "other:delayed~12"]:
        assert keys.base_of(key, suffix) is None, key


def test_derived_names_are_the_same_in_every_process() -> None:
    """Two workers must agree on where a progress key is: the name depends on the base alone."""
    keys.beside.cache_clear()
    first = [keys.beside(base, "__progress") for base in AWKWARD]
    keys.beside.cache_clear()
    assert [keys.beside(base, "__progress") for base in AWKWARD] == first


def test_names_of_1_2_and_of_the_design_stay() -> None:
    assert keys.beside("taskiq", ":dead") == "{taskiq}:dead"
    assert keys.beside("x{y}z", "__progress") == "x{y}z__progress"
    assert keys.beside("a{b", "__progress") == "{a{b}__progress"


def test_a_suffix_that_closes_a_hash_tag_is_refused() -> None:
    """``}{`` + ``x}`` makes every candidate hash ``x``: no derived name can land beside ``}{``."""
    with pytest.raises(keys.SlotError, match=r"'\}\{'.*hash tag \{x\}"):
        keys.beside("}{", "x}")


@pytest.mark.parametrize("prefix", ["", "}", "}x"])
def test_a_schedule_prefix_no_hash_tag_can_hold_is_refused_on_a_cluster(prefix: str) -> None:
    with pytest.raises(keys.SlotError, match="schedule prefix"):
        keys.schedule_base(prefix, cluster=True)
    assert keys.schedule_base(prefix, cluster=False) == prefix


@pytest.mark.parametrize("prefix", ["schedule", "a}b", "a{}b", "{", "x{y}z"])
def test_every_key_of_a_schedule_source_shares_one_slot(prefix: str) -> None:
    base = keys.schedule_base(prefix, cluster=True)
    derived = [
        keys.schedule_key(base, "id}1"),
        keys.schedule_index_key(base),
        keys.schedule_probe_key(base),
        keys.schedule_data_key(base, "{}"),
        keys.schedule_cron_key(base),
        keys.schedule_interval_key(base),
        keys.schedule_time_key(base, "2026-01-01T00:00"),
        keys.schedule_time_index_key(base),
    ]
    assert {slot_of(key) for key in derived} == {slot_of(derived[0])}, derived


@pytest.mark.parametrize("task_id", ["job}1", "a{}b", "{}", "x{y}z", "}{", "{job}"])
@pytest.mark.parametrize("keep_results", [True, False])
async def test_results_and_progress_of_any_task_id(
    topology: Topology, task_id: str, keep_results: bool
) -> None:
    """On a cluster, reading used to fail with 'keys must map to the same key slot'."""
    cls: Any = topology.pick(
        single=RedisAsyncResultBackend,
        cluster=RedisAsyncClusterResultBackend,
        sentinel=RedisAsyncSentinelResultBackend,
    )
    backend: BaseRedisResultBackend[Any] = cls(
        **topology.kwargs("redis_url"), keep_results=keep_results
    )
    await backend.startup()
    client = topology.client()
    try:
        await client.delete(task_id, keys.progress_key(task_id))
        progress = TaskProgress(state=TaskState.STARTED, meta={"step": 1})
        await backend.set_progress(task_id, progress)
        assert await backend.get_progress(task_id) == progress
        await backend.set_result(
            task_id, TaskiqResult(is_err=False, return_value=7, execution_time=0)
        )
        assert (await backend.get_result(task_id)).return_value == 7
        assert await backend.is_result_ready(task_id) is keep_results
        assert (await backend.get_progress(task_id) is None) is not keep_results
    finally:
        await client.delete(task_id, keys.progress_key(task_id))
        await client.aclose()
        await backend.shutdown()
