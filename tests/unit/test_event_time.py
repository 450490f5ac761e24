"""The node's time of an AMI event, as answers carry it."""

from datetime import UTC, datetime

import pytest

from controlplane.calls.node_control import event_time


def test_an_events_timestamp_is_its_time_in_utc():
    assert event_time("1764748800.250000") == datetime(2025, 12, 3, 8, 0, 0, 250000, UTC)


@pytest.mark.parametrize("stamp", [None, "", "soon", "nan", "inf", "-1", "0", "1e300"])
def test_no_time_or_an_unreadable_one_is_none(stamp):
    assert event_time(stamp) is None
