//! `POST /users/track` over real HTTP: the REST API key, Braze's limits, per-object
//! errors in a 201, update-only objects, the segment query, and the state file.

use braze_sandbox::{Faults, RateLimit, RestApiKey, Sandbox, SandboxConfig, SandboxUser};
use serde_json::{Value, json};

fn config() -> SandboxConfig {
    SandboxConfig {
        rest_api_keys: vec![
            RestApiKey::users_track("rest-key"),
            RestApiKey { key: "export-only".into(), permissions: vec!["users.export.ids".into()] },
        ],
        users: vec![SandboxUser::identified("u1"), SandboxUser::identified("u2"), SandboxUser::alias("n1", "crm")],
        ..SandboxConfig::default()
    }
}

async fn track(url: &str, key: Option<&str>, body: Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = reqwest::Client::new().post(format!("{url}/users/track")).json(&body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let resp = request.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap())
}

fn add(id: &str, value: &str) -> Value {
    json!({"external_id": id, "_update_existing_only": true, "cohorts": {"add": [value]}})
}

#[tokio::test]
async fn the_rest_api_key_is_checked_401_then_403() {
    let sandbox = Sandbox::start(config()).await.unwrap();
    let body = json!({"attributes": [add("u1", "vip")]});
    let (s, _, b) = track(&sandbox.url(), None, body.clone()).await;
    assert_eq!((s, b["message"].as_str().unwrap()), (401, "Unknown or missing REST API key"));
    let (s, _, _) = track(&sandbox.url(), Some("wrong"), body.clone()).await;
    assert_eq!(s, 401);
    let (s, _, b) = track(&sandbox.url(), Some("export-only"), body.clone()).await;
    assert_eq!(s, 403, "{b}");
    assert!(b["message"].as_str().unwrap().contains("users.track"));
    assert!(sandbox.attributes("u1").is_none(), "refused requests change nothing");
    sandbox.set_rest_api_keys(vec![RestApiKey::users_track("rotated")]);
    assert_eq!(track(&sandbox.url(), Some("rest-key"), body.clone()).await.0, 401, "a deleted key");
    assert_eq!(track(&sandbox.url(), Some("rotated"), body).await.0, 201);
}

#[tokio::test]
async fn seventy_five_objects_at_most_and_unknown_fields_refused() {
    let sandbox = Sandbox::start(config()).await.unwrap();
    let objects: Vec<Value> = (0..76).map(|i| add(&format!("x{i}"), "vip")).collect();
    let (s, _, b) = track(&sandbox.url(), Some("rest-key"), json!({ "attributes": objects })).await;
    assert_eq!(s, 400, "{b}");
    let (s, _, _) = track(&sandbox.url(), Some("rest-key"), json!({"attributes": [], "users": []})).await;
    assert_eq!(s, 400);
    let stats = sandbox.stats().track;
    assert_eq!((stats.requests, stats.max_objects_in_request, stats.data_points), (2, 76, 0));
}

#[tokio::test]
async fn bad_objects_are_listed_in_a_201_and_update_only_creates_nobody() {
    let sandbox = Sandbox::start(config()).await.unwrap();
    let body = json!({"attributes": [
        add("u1", "vip"),
        {"cohorts": {"add": ["vip"]}},
        add("nobody", "vip"),
        {"user_alias": {"alias_name": "n1", "alias_label": "crm"}, "_update_existing_only": true, "vip": true},
        {"external_id": "u2", "_update_existing_only": true, "cohorts": {"add": ["vip"], "bogus": 1}},
    ]});
    let (s, _, b) = track(&sandbox.url(), Some("rest-key"), body).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["message"], "success");
    let errors = b["errors"].as_array().unwrap();
    let indices: Vec<u64> = errors.iter().map(|e| e["index"].as_u64().unwrap()).collect();
    assert_eq!(indices, [1, 4]);
    assert_eq!(errors[0]["type"], "'external_id' or 'braze_id' or 'user_alias' is required");
    assert_eq!(errors[0]["input_array"], "attributes");
    assert_eq!(sandbox.user_count(), 3, "the update-only object for an unknown user created nobody");
    let stats = sandbox.stats().track;
    assert_eq!((stats.unknown_users, stats.users_created, stats.object_errors), (1, 0, 2));
    assert_eq!(sandbox.segment_external_ids("cohorts", Some("vip")), ["u1"]);
    let aliased = sandbox.segment("vip", None);
    assert_eq!(aliased, [SandboxUser::alias("n1", "crm")]);

    // Without the flag an external id object creates its user, as Braze does: recorded.
    let (s, _, _) =
        track(&sandbox.url(), Some("rest-key"), json!({"attributes": [{"external_id": "new", "a": 1}]})).await;
    assert_eq!(s, 201);
    let stats = sandbox.stats().track;
    assert_eq!((stats.users_created, stats.missing_update_existing_only), (1, 1));
}

#[tokio::test]
async fn the_segment_query_and_wasted_writes() {
    let sandbox = Sandbox::start(config()).await.unwrap();
    let key = Some("rest-key");
    track(&sandbox.url(), key, json!({"attributes": [add("u1", "vip"), add("u2", "vip")]})).await;
    track(&sandbox.url(), key, json!({"attributes": [add("u1", "vip")]})).await;
    let remove = json!({"external_id": "u2", "_update_existing_only": true, "cohorts": {"remove": ["vip"]}});
    track(&sandbox.url(), key, json!({ "attributes": [remove] })).await;
    let url = format!("{}/sandbox/segment?attribute=cohorts&includes=vip", sandbox.url());
    let users: Vec<SandboxUser> = reqwest::get(url).await.unwrap().json().await.unwrap();
    assert_eq!(users, [SandboxUser::identified("u1")]);
    let stats = sandbox.stats().track;
    assert_eq!((stats.data_points, stats.wasted_writes), (4, 1), "adding vip to u1 twice wasted one");
    assert_eq!(sandbox.attributes("u2").unwrap()["cohorts"], json!([]));
}

#[tokio::test]
async fn brazes_rate_limit_for_the_endpoint_is_on_by_default_and_settable() {
    let sandbox = Sandbox::start(config()).await.unwrap();
    let (s, headers, _) = track(&sandbox.url(), Some("rest-key"), json!({"attributes": []})).await;
    assert_eq!(s, 201);
    assert_eq!(headers["x-ratelimit-limit"], "3000", "Braze's documented 3,000 per 3 seconds");
    let limit = RateLimit { requests: 1, window_ms: 60_000, retry_after: false };
    sandbox.set_track_faults(Faults { rate_limit: Some(limit), ..Faults::default() });
    assert_eq!(track(&sandbox.url(), Some("rest-key"), json!({"attributes": []})).await.0, 201);
    let (s, headers, _) = track(&sandbox.url(), Some("rest-key"), json!({"attributes": [add("u1", "x")]})).await;
    assert_eq!(s, 429);
    assert_eq!(headers["x-ratelimit-remaining"], "0");
    assert!(sandbox.attributes("u1").is_none(), "a 429 is not applied");
    assert_eq!(sandbox.stats().track.max_requests_in_rate_window, 2);
}

#[tokio::test]
async fn attributes_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let sandbox = Sandbox::start(SandboxConfig { state_file: Some(state.clone()), ..config() }).await.unwrap();
    track(&sandbox.url(), Some("rest-key"), json!({"attributes": [add("u1", "vip")]})).await;
    sandbox.shutdown().await.unwrap();
    let again = Sandbox::start(SandboxConfig { state_file: Some(state), ..config() }).await.unwrap();
    assert_eq!(again.segment_external_ids("cohorts", Some("vip")), ["u1"]);
}
