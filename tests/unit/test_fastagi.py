"""The FastAGI server against a client speaking Asterisk's side of the protocol."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from controlplane.asterisk.fastagi import (
    AgiProtocolError,
    AgiRequest,
    FastAgiServer,
    pack,
    parse_environment,
    quote,
)


async def ask(port: int, script: str, *args: str, answer_with: bytes = b"200 result=1\n",
              callerid: str = "1001") -> tuple[list[str], float]:
    """Connect like Asterisk's AGI(agi://...): send the environment, acknowledge every
    command; returns the commands received and how long the exchange took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # the arguments in the script's path, as the node's dialplan sends them
    env = [f"agi_network_script: {'/'.join((script, *args))}",
           "agi_channel: PJSIP/100001-00000001", "agi_uniqueid: node-1.1",
           f"agi_callerid: {callerid}"]
    writer.write(("\n".join(env) + "\n\n").encode())
    await writer.drain()
    commands = []
    while line := await reader.readline():
        commands.append(line.decode().rstrip("\n"))
        writer.write(answer_with)
        await writer.drain()
    writer.close()
    return commands, loop.time() - start


def policy(req: AgiRequest) -> Mapping[str, str]:
    return {"PBX_DECISION": "refuse", "PBX_SIP_CODE": "503"}


async def serve(handler, **kw) -> tuple[FastAgiServer, int]:
    server = FastAgiServer({"admit": handler}, on_timeout=policy, **kw)
    return server, await server.start("127.0.0.1", 0)


async def test_handler_sees_script_arguments_and_channel_and_its_variables_are_set():
    seen = []

    async def admit(req: AgiRequest) -> Mapping[str, str]:
        seen.append(req)
        return {"PBX_DECISION": "admit", "PBX_TARGET": "100002"}

    server, port = await serve(admit)
    try:
        commands, _ = await ask(port, "admit", "7", "", "1002")
    finally:
        await server.close()
    assert seen[0].args == ("7", "", "1002") and seen[0].channel == "PJSIP/100001-00000001"
    assert seen[0].uniqueid == "node-1.1" and seen[0].callerid == "1001"
    # several variables in one command, split by the dialplan
    assert commands == ['SET VARIABLE PBX_R "PBX_DECISION,PBX_TARGET|admit,100002"']


async def test_a_slow_decision_is_answered_by_policy_within_the_timeout():
    async def admit(req: AgiRequest) -> Mapping[str, str]:
        await asyncio.sleep(10)
        return {"PBX_DECISION": "admit"}

    server, port = await serve(admit, handler_timeout=0.2)
    try:
        commands, took = await ask(port, "admit")
    finally:
        await server.close()
    assert commands == ['SET VARIABLE PBX_R "PBX_DECISION,PBX_SIP_CODE|refuse,503"']
    assert took < 1.0


async def test_a_decision_slow_to_let_go_is_answered_on_time_and_handed_over():
    """A handler that does not stop when the time is up (a clean-up through a silent
    network, say) does not hold the call: the policy answers on time, and the handler,
    still running, is handed to on_abandoned, which sees how it ends."""
    release = asyncio.Event()
    abandoned: list[asyncio.Task[Mapping[str, str]]] = []

    async def admit(req: AgiRequest) -> Mapping[str, str]:
        await release.wait()
        return {"PBX_DECISION": "admit", "PBX_CALL": "c1"}

    server, port = await serve(admit, handler_timeout=0.2,
                               on_abandoned=lambda req, task: abandoned.append(task))
    try:
        commands, took = await ask(port, "admit")
        [task] = abandoned
        assert not task.done()
        release.set()
        assert (await task)["PBX_CALL"] == "c1"
    finally:
        await server.close()
    assert commands == ['SET VARIABLE PBX_R "PBX_DECISION,PBX_SIP_CODE|refuse,503"']
    assert took < 1.0


async def test_a_failing_decision_is_answered_by_policy():
    async def admit(req: AgiRequest) -> Mapping[str, str]:
        raise RuntimeError("bug")

    server, port = await serve(admit)
    try:
        commands, _ = await ask(port, "admit")
    finally:
        await server.close()
    assert commands == ['SET VARIABLE PBX_R "PBX_DECISION,PBX_SIP_CODE|refuse,503"']


async def test_an_unknown_script_gets_no_commands():
    async def admit(req: AgiRequest) -> Mapping[str, str]:
        return {"X": "1"}

    server, port = await serve(admit)
    try:
        commands, _ = await ask(port, "other")
    finally:
        await server.close()
    assert commands == []


async def test_a_peer_that_never_sends_its_environment_is_dropped():
    async def admit(req: AgiRequest) -> Mapping[str, str]:
        return {}

    server, port = await serve(admit, read_timeout=0.2)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"agi_network_script: admit\n")  # and never the blank line
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
    finally:
        await server.close()


@pytest.mark.parametrize("value", ["a\nb", "a\rb"])
def test_values_cannot_carry_line_breaks(value):
    with pytest.raises(ValueError):
        quote(value)


def test_quotes_and_backslashes_are_escaped():
    assert quote('say "hi" \\ bye') == '"say \\"hi\\" \\\\ bye"'


async def test_values_the_dialplan_would_split_are_sent_one_by_one():
    async def admit(req: AgiRequest) -> Mapping[str, str]:
        return {"PBX_DECISION": "refuse", "PBX_REASON": 'a,b|"c"'}

    server, port = await serve(admit)
    try:
        commands, _ = await ask(port, "admit")
    finally:
        await server.close()
    assert commands == ['SET VARIABLE PBX_DECISION "refuse"',
                        'SET VARIABLE PBX_REASON "a,b|\\"c\\""', 'SET VARIABLE PBX_R "PBX_R|"']


def test_pack_refuses_function_names_and_dialplan_syntax():
    assert pack({"PBX_A": "1", "PBX_B": ""}) == "PBX_A,PBX_B|1,"
    assert pack({"TIMEOUT(absolute)": "5"}) is None
    assert pack({"PBX_A": "${SHELL(id)}"}) is None
    assert pack({"PBX_A": "x)"}) is None


def test_the_exchange_works_on_uvloop_as_the_agent_runs_it():
    """`pbxctl agent` runs on uvloop, whose transports are not asyncio's classes."""
    from controlplane.eventloop import run_loop

    async def admit(req: AgiRequest) -> Mapping[str, str]:
        return {"PBX_DECISION": "admit", "PBX_TARGET": req.args[0]}

    async def exchange() -> tuple[str, list[str]]:
        server, port = await serve(admit)
        try:
            commands, _ = await ask(port, "admit", "100002")
        finally:
            await server.close()
        return type(asyncio.get_running_loop()).__module__, commands

    loop_module, commands = run_loop("uvloop", exchange())
    assert loop_module.startswith("uvloop")
    assert commands == ['SET VARIABLE PBX_R "PBX_DECISION,PBX_TARGET|admit,100002"']


async def test_the_last_command_ends_the_exchange_before_its_acknowledgement():
    """Asterisk leaves the AGI when it reads the end of the stream after a command: the
    server sends its end with the last command, then still reads the acknowledgement."""
    async def admit(req: AgiRequest) -> Mapping[str, str]:
        return {"PBX_DECISION": "admit", "PBX_TARGET": "100002"}

    server, port = await serve(admit)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"agi_network_script: admit\nagi_channel: PJSIP/1-1\n\n")
        command = await asyncio.wait_for(reader.readline(), 5)
        # the end arrives with the command, not after the acknowledgement
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert server.served == 0
        writer.write(b"200 result=1\n")
        await writer.drain()
        for _ in range(100):
            if server.served:
                break
            await asyncio.sleep(0.01)
        writer.close()
    finally:
        await server.close()
    assert command == b'SET VARIABLE PBX_R "PBX_DECISION,PBX_TARGET|admit,100002"\n'
    assert server.served == 1


async def test_a_refused_acknowledgement_of_the_last_command_is_not_served():
    async def admit(req: AgiRequest) -> Mapping[str, str]:
        return {"PBX_DECISION": "admit"}

    server, port = await serve(admit)
    try:
        commands, _ = await ask(port, "admit", answer_with=b"510 Invalid\n")
        await asyncio.sleep(0.05)
    finally:
        await server.close()
    assert commands == ['SET VARIABLE PBX_DECISION "admit"'] and server.served == 0


async def test_with_a_token_only_requests_carrying_it_are_decided(caplog):
    from controlplane.asterisk.fastagi import node_token

    seen = []

    async def admit(req: AgiRequest) -> Mapping[str, str]:
        seen.append(req.script)
        return {"PBX_DECISION": "admit"}

    token = node_token("ami-secret-123456", "n1")
    assert token == node_token("ami-secret-123456", "n1") != node_token("other-secret", "n1")
    assert token != node_token("ami-secret-123456", "n2") and len(token) == 32
    server, port = await serve(admit, token=token)
    try:
        # until the node is given the token, what an earlier agent set is still answered
        assert (await ask(port, "admit"))[0] == ["SET VARIABLE PBX_DECISION \"admit\""]
        assert (await ask(port, "admit", "7", "internal"))[0] != []
        assert (await ask(port, f"{'0' * 32}/admit"))[0] == []
        server.token_given = True
        good, _ = await ask(port, f"{token}/admit", "7", "internal")
        # no token, a wrong one, the right one on a route that does not exist
        for script in ("admit", f"{'0' * 32}/admit", f"{token[:-1]}x/admit", "/admit"):
            assert (await ask(port, script))[0] == []
        assert (await ask(port, f"{token}/nothing"))[0] == []
    finally:
        await server.close()
    assert good == ["SET VARIABLE PBX_DECISION \"admit\""]
    assert seen == ["admit"] * 3  # the handler sees the route, never the token
    assert server.refused == 5
    refusals = [r for r in caplog.records if "without this node's token" in r.getMessage()]
    assert len(refusals) == 1  # at most one warning a minute, counting the others
    assert all(token not in r.getMessage() for r in caplog.records)


async def test_arguments_come_from_the_script_path_never_from_lines_a_caller_id_can_add():
    """A caller ID (or Diversion) from the network holding line breaks precedes the
    agi_arg_* lines: it can end the environment early and write arguments of its own. The
    handler must see only those of the script's path."""
    seen = []

    async def admit(req: AgiRequest) -> Mapping[str, str]:
        seen.append(req.args)
        return {"PBX_DECISION": "refuse", "PBX_SIP_CODE": "404"}

    server, port = await serve(admit)
    forged = "1\nagi_arg_1:\nagi_arg_2: external\nagi_arg_3: 5511999999999\n" \
        "agi_arg_4: 654321\n"
    try:
        await ask(port, "admit", "7", "internal", "7002", "100001", callerid=forged)
    finally:
        await server.close()
    assert seen == [("7", "internal", "7002", "100001")]


@pytest.mark.parametrize("block", [
    # a caller ID from the network holding a line break and a key of its own, before or
    # after Asterisk's own line of that key
    b"agi_channel: PJSIP/carrier-00000001\nagi_callerid: 1\nagi_arg_3: 7001\n"
    b"agi_arg_3: 5511999999999\n",
    b"agi_channel: PJSIP/carrier-00000001\nagi_callerid: 1\n"
    b"agi_channel: PJSIP/victim-00000002\n",
    # channel names Asterisk never makes: an AMI regular expression, a blank
    b"agi_channel: /PJSIP/.*/\n",
    b"agi_channel: PJSIP/a b\n",
])
def test_an_environment_that_cannot_be_asterisks_own_is_refused(block: bytes):
    with pytest.raises(AgiProtocolError):
        parse_environment(block)


def test_a_plain_environment_is_read_whole():
    env = parse_environment(b"agi_channel: PJSIP/100001-0000000a\nagi_callerid: 1001\n"
                            b"agi_arg_1: 7\nagi_arg_2: internal\n")
    assert env == {"agi_channel": "PJSIP/100001-0000000a", "agi_callerid": "1001",
                   "agi_arg_1": "7", "agi_arg_2": "internal"}


async def test_connections_beyond_the_cap_are_closed_and_counted_not_each_logged(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """Anything that can reach the port could open connections and send nothing: beyond
    MAX_EXCHANGES they are closed at once, and failures are logged in one line at a time."""
    from controlplane.asterisk import fastagi

    monkeypatch.setattr(fastagi, "MAX_EXCHANGES", 2)

    async def admit(req: AgiRequest) -> Mapping[str, str]:
        return {"PBX_DECISION": "admit"}

    server, port = await serve(admit, read_timeout=0.5)
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    try:
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 2) == b""  # closed unanswered
        writer.close()
        assert server.failed == 1
        await asyncio.sleep(0.8)  # the silent ones time out and free their places
        assert (await ask(port, "admit"))[0] == ['SET VARIABLE PBX_DECISION "admit"']
    finally:
        for _, w in idle:
            w.close()
        await server.close()
    assert server.failed == 3
    failures = [r for r in caplog.records if "FastAGI request failed" in r.getMessage()]
    assert len(failures) == 1 and "3 failed" not in failures[0].getMessage()


@pytest.mark.parametrize("acknowledgement", [b"200 result=1\n", b"511 Command Not Permitted\n"])
async def test_a_channel_hung_up_while_it_was_answered_is_told_not_failed(acknowledgement):
    """Asterisk writes HANGUP ahead of the reply when the caller leaves during the decision:
    the exchange ends normally and the server is told, with the answer it gave."""
    told = []

    async def admit(req: AgiRequest) -> Mapping[str, str]:
        return {"PBX_DECISION": "admit", "PBX_CALL": "c-1"}

    server = FastAgiServer({"admit": admit}, on_timeout=policy,
                           on_hung_up=lambda req, answer: told.append((req.uniqueid, answer)))
    port = await server.start("127.0.0.1", 0)
    try:
        commands, _ = await ask(port, "admit", answer_with=b"HANGUP\n" + acknowledgement)
        await asyncio.sleep(0.05)
    finally:
        await server.close()
    assert commands == ['SET VARIABLE PBX_R "PBX_DECISION,PBX_CALL|admit,c-1"']
    assert (server.served, server.failed, server.hung_up) == (1, 0, 1)
    assert told == [("node-1.1", {"PBX_DECISION": "admit", "PBX_CALL": "c-1"})]


async def test_a_refusal_after_a_hang_up_is_still_a_failure():
    told = []

    async def admit(req: AgiRequest) -> Mapping[str, str]:
        return {"PBX_DECISION": "admit"}

    server = FastAgiServer({"admit": admit}, on_timeout=policy,
                           on_hung_up=lambda req, answer: told.append(answer))
    port = await server.start("127.0.0.1", 0)
    try:
        await ask(port, "admit", answer_with=b"HANGUP\n520 Invalid command\n")
        await asyncio.sleep(0.05)
    finally:
        await server.close()
    assert (server.served, server.failed, told) == (0, 1, [])
