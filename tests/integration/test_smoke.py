async def test_operator_sees_itself_as_the_root(api):
    me = api.ok(await api.get("/api/v1/dealers"))
    assert [d["level"] for d in me["items"]] == ["operator"]
