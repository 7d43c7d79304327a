import httpx
from support import token_for


async def test_push_then_pull(shared_hub, user):
    headers = {"Authorization": f"Bearer {token_for(user)}"}
    async with httpx.AsyncClient(base_url=shared_hub.url, headers=headers, timeout=10) as http:
        r = await http.post(
            "/v1/sync/push",
            json={
                "device": "d1",
                "changes": [
                    {
                        "collection": "todos",
                        "id": "t1",
                        "op": "upsert",
                        "fields": {"title": {"value": "a", "hlc": "1732185600123-0000-d1"}},
                    }
                ],
            },
        )
        assert r.status_code == 200, r.text
        assert r.json() == {"version": 1, "applied": 1, "ignored": 0}
        r = await http.get("/v1/sync/pull", params={"since": "0"})
        assert r.json()["changes"][0]["fields"]["title"]["value"] == "a"
