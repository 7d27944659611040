//! The sandbox over real HTTP: Braze's answers, the admin API, faults and the state file.

use braze_sandbox::{DataImportKey, Partner, Sandbox, SandboxConfig, SandboxUser, Stats};
use serde_json::{Value, json};

fn config() -> SandboxConfig {
    SandboxConfig {
        partners: vec![Partner { name: "acme".into(), api_key: "pk".into() }],
        data_import_keys: vec![
            DataImportKey { key: "dik".into(), partners: vec![] },
            DataImportKey { key: "dik-other".into(), partners: vec!["other".into()] },
        ],
        users: vec![
            SandboxUser::identified("u1"),
            SandboxUser::identified("u2"),
            SandboxUser::alias("n1", "crm"),
            SandboxUser::anonymous("d1"),
        ],
        ..SandboxConfig::default()
    }
}

async fn post(url: &str, body: Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = reqwest::Client::new().post(url).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap())
}

fn users_body(key: &str, changes: Value) -> Value {
    json!({"partner_api_key": "pk", "client_secret": key, "cohort_id": "c1", "cohort_changes": changes})
}

#[tokio::test]
async fn brazes_answers_for_keys_and_bodies() {
    let sandbox = Sandbox::start(config()).await.unwrap();
    let users = format!("{}/partners/acme/cohorts/users", sandbox.url());
    let name = format!("{}/partners/acme/cohorts", sandbox.url());

    let (s, _, b) = post(
        &users,
        json!({"partner_api_key": "nope", "client_secret": "dik", "cohort_id": "c1", "cohort_changes": []}),
    )
    .await;
    assert_eq!((s, b["message"].as_str().unwrap()), (401, "Invalid Partner API key"));
    let (s, _, b) = post(&users, users_body("nope", json!([]))).await;
    assert_eq!((s, b["message"].as_str().unwrap()), (401, "Invalid client secret"));
    let (s, _, b) = post(&users, users_body("dik-other", json!([]))).await;
    assert_eq!(
        (s, b["message"].as_str().unwrap()),
        (401, "Partner not enabled for client with client secret: dik-other")
    );
    let (s, _, b) = post(&users, users_body("dik", json!([{"user_ids": "u1"}]))).await;
    assert_eq!(s, 400);
    assert!(b["message"].as_str().unwrap().starts_with("cohort_changes must be"));
    let many: Vec<String> = (0..1001).map(|i| format!("x{i}")).collect();
    let (s, _, b) = post(&users, users_body("dik", json!([{"user_ids": many}]))).await;
    assert_eq!(
        (s, b["message"].as_str().unwrap()),
        (400, "Only 1,000 user_ids, device_ids, and aliases are allowed per request")
    );
    let (s, _, _) = post(
        &name,
        json!({"partner_api_key": "pk", "client_secret": "dik", "cohort_id": "c1", "name": "N", "created_at": "soon"}),
    )
    .await;
    assert_eq!(s, 400);
    let (s, _, b) = post(&name, json!({"partner_api_key": "pk", "client_secret": "dik", "cohort_id": "c1", "name": "N", "created_at": "2024-01-01T00:00:00Z"})).await;
    assert_eq!((s, b["message"].as_str().unwrap()), (201, "success"));

    let (s, _, _) = post(&users, users_body("dik", json!([
        {"user_ids": ["u1", "u2", "ghost"], "aliases": [{"alias_name": "n1", "alias_label": "crm"}], "device_ids": ["d1"]},
        {"user_ids": ["u2"], "should_remove": true}
    ]))).await;
    assert_eq!(s, 201);

    // Admin API.
    let get = |path: &str| {
        let url = format!("{}{path}", sandbox.url());
        async move { reqwest::get(url).await.unwrap().json::<Value>().await.unwrap() }
    };
    assert_eq!(get("/sandbox/cohort-names").await, json!(["N"]));
    let members = get("/sandbox/cohorts/c1/members").await;
    assert_eq!(
        members,
        json!([{"external_id": "u1"}, {"aliases": [{"alias_name": "n1", "alias_label": "crm"}]}, {"device_ids": ["d1"]}])
    );
    let cohorts = get("/sandbox/cohorts").await;
    assert_eq!(cohorts[0]["members"], 3);
    let stats: Stats = serde_json::from_value(get("/sandbox/stats").await).unwrap();
    assert_eq!((stats.ids_received, stats.ids_matched, stats.ids_unmatched), (6, 5, 1));
    assert_eq!(stats.removes_received, 1, "the one should_remove id");
    assert_eq!((stats.joined, stats.left), (4, 1));
    assert_eq!(stats.max_ids_in_request, 1001);
    assert_eq!(stats.responses_by_status.get(&401), Some(&3));
    let requests = get("/sandbox/requests").await;
    assert!(!requests.to_string().contains("\"pk\""), "the request log keeps no keys");

    let client = reqwest::Client::new();
    let added: Value = client
        .post(format!("{}/sandbox/users", sandbox.url()))
        .json(&json!([{"external_id": "u3"}, {"external_id": "u9", "device_ids": ["d1"]}]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(added, json!({"users": 5}), "d1 was identified as u9: merged, not added");
    let (_, _, _) = post(&users, users_body("dik", json!([{"device_ids": ["d1"], "should_remove": true}]))).await;
    assert_eq!(sandbox.members("acme", "c1").unwrap().len(), 3, "an identified user's device id no longer matches");

    let resp = client
        .put(format!("{}/sandbox/data-import-keys", sandbox.url()))
        .json(&json!([{"key": "dik2"}]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    let (s, _, _) = post(&users, users_body("dik", json!([]))).await;
    assert_eq!(s, 401, "an invalidated key is refused");
}

#[tokio::test]
async fn faults_over_http_rate_limit_headers_and_drops() {
    let sandbox = Sandbox::start(config()).await.unwrap();
    let client = reqwest::Client::new();
    let resp = client
        .put(format!("{}/sandbox/faults", sandbox.url()))
        .json(&json!({"rate_limit": {"requests": 1, "window_ms": 60000, "retry_after": true}, "script": [502, "drop"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let users = format!("{}/partners/acme/cohorts/users", sandbox.url());
    let body = users_body("dik", json!([{"user_ids": ["u1"]}]));
    let (s, h, _) = post(&users, body.clone()).await;
    assert_eq!(s, 502);
    assert_eq!(h["x-ratelimit-limit"], "1");
    let dropped = client.post(&users).json(&body).send().await;
    assert!(dropped.is_err(), "the connection closes without an answer");
    let (s, h, b) = post(&users, body.clone()).await;
    assert_eq!((s, b["message"].as_str().unwrap()), (429, "Rate limit exceeded"));
    assert_eq!(h["x-ratelimit-remaining"], "0");
    let reset: u64 = h["x-ratelimit-reset"].to_str().unwrap().parse().unwrap();
    assert!(reset > jiff::Timestamp::now().as_second() as u64);
    assert!(h.contains_key("retry-after"));
    let bad = client.put(format!("{}/sandbox/faults", sandbox.url())).json(&json!({"typo": 1})).send().await.unwrap();
    assert_eq!(bad.status().as_u16(), 422);
    let stats = sandbox.stats();
    assert_eq!((stats.requests, stats.dropped_connections), (3, 1));
    assert!(sandbox.member_external_ids("acme", "c1").is_empty(), "faulted requests are not applied");
}

#[tokio::test]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let sandbox = Sandbox::start(SandboxConfig { state_file: Some(state.clone()), ..config() }).await.unwrap();
    let (s, _, _) = post(
        &format!("{}/partners/acme/cohorts/users", sandbox.url()),
        users_body("dik", json!([{"user_ids": ["u2"]}])),
    )
    .await;
    assert_eq!(s, 201);
    sandbox.shutdown().await.unwrap();
    let again = Sandbox::start(SandboxConfig { state_file: Some(state), ..config() }).await.unwrap();
    assert_eq!(again.member_external_ids("acme", "c1"), ["u2"]);
    assert_eq!(again.user_count(), 4, "seeded users merge into the saved ones");
}
