//! A hostile "Databricks workspace" on loopback: the `host` a tenant writes may be any
//! server, and this one answers the Statement Execution API's submit with `SUCCEEDED` and one
//! `INLINE` result chunk of `rows` one-character ids (`["a"],["b"],…`), generated as it is
//! sent, without `Content-Length` (a real workspace caps inline results at 25 MiB).
// Shared by tests and the hostile_sources benchmark; each uses part of it.
#![allow(dead_code)]

use axum::Router;
use axum::body::{Body, Bytes};
use axum::routing::post;
use futures::StreamExt;

/// Rows per generated block of the body.
const BLOCK_ROWS: u64 = 100_000;

/// The submit answer: the statement, its manifest, then `data_array` streamed.
fn inline_chunk(rows: u64) -> Body {
    let head = format!(
        r#"{{"statement_id":"01hostile","status":{{"state":"SUCCEEDED"}},"manifest":{{"format":"JSON_ARRAY","schema":{{"column_count":1,"columns":[{{"name":"user_id","type_name":"STRING","position":0}}]}},"total_chunk_count":1,"total_row_count":{rows},"truncated":false}},"result":{{"chunk_index":0,"row_offset":0,"row_count":{rows},"data_array":["#
    );
    let blocks = futures::stream::iter(0..rows.div_ceil(BLOCK_ROWS)).map(move |b| {
        let mut block = String::with_capacity(BLOCK_ROWS as usize * 6);
        for i in b * BLOCK_ROWS..((b + 1) * BLOCK_ROWS).min(rows) {
            if i > 0 {
                block.push(',');
            }
            block.push_str("[\"");
            block.push(char::from(b'a' + (i % 26) as u8));
            block.push_str("\"]");
        }
        Ok::<_, std::io::Error>(Bytes::from(block))
    });
    let head = futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(head)) });
    let tail = futures::stream::once(async { Ok::<_, std::io::Error>(Bytes::from_static(b"]}}")) });
    Body::from_stream(head.chain(blocks).chain(tail))
}

/// Bytes of the answer for `rows` rows (6 bytes a row).
pub fn inline_chunk_bytes(rows: u64) -> u64 {
    rows * 6
}

/// Serves a workspace whose every answer is a 500 with a body that never ends; returns its
/// base URL.
pub async fn serve_endless_error() -> String {
    let endless = || {
        let block = Bytes::from(vec![b'!'; 64 * 1024]);
        let head = futures::stream::once(async { Ok::<_, std::io::Error>(Bytes::from_static(b"{\"message\":\"")) });
        Body::from_stream(head.chain(futures::stream::repeat_with(move || Ok(block.clone()))))
    };
    let router = Router::new().route(
        "/api/2.0/sql/statements",
        post(move || async move { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, endless()) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    base
}

/// Serves the workspace; returns its base URL.
pub async fn serve_inline_chunk(rows: u64) -> String {
    let router = Router::new().route("/api/2.0/sql/statements", post(move || async move { inline_chunk(rows) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    base
}
