//! `GET /openapi.json` against a real server: an OpenAPI 3.1 document in which every
//! operation is a route the server has. (That the answers conform to it is schemathesis's
//! part, in `.ci/schemathesis.sh`.)

mod common;

use common::*;
use mcd_serve::config::ServeArgs;
use serde_json::Value;

#[tokio::test]
async fn every_documented_operation_is_a_route_of_the_server() {
    let mut args = ServeArgs::for_models(models_dir());
    args.default_model = Some("breast_cancer".into());
    let s = TestServer::start(args).await;
    let (status, doc) = s.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 17, "{:?}", paths.keys());
    let client = reqwest::Client::new();
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            // Path parameters from their examples.
            let mut url = path.clone();
            for p in op["parameters"].as_array().into_iter().flatten() {
                if p["in"] == "path" {
                    let example = p["example"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{path}: no example for {}", p["name"]));
                    url = url.replace(&format!("{{{}}}", p["name"].as_str().unwrap()), example);
                }
            }
            let request = match method.as_str() {
                "get" => client.get(s.url(&url)),
                "post" => client.post(s.url(&url)).body("{}"),
                other => panic!("{path}: unexpected method {other}"),
            };
            let answer = request.send().await.unwrap();
            let status = answer.status().as_u16();
            let body: Value = answer.json().await.unwrap_or(Value::Null);
            assert!(
                status != 405 && body["error_type"] != "not_found",
                "{method} {url} is documented but not routed: {status} {body}"
            );
            let documented = op["responses"].as_object().unwrap();
            assert!(
                documented.contains_key(&status.to_string()),
                "{method} {url} answered {status}, which the document does not list"
            );
        }
    }
}

/// With `--api-key-file`, a call without a key answers 401 exactly where the document
/// lists a 401 (and declares the bearer scheme), and answers as before elsewhere.
#[tokio::test]
async fn the_document_says_which_operations_need_a_key() {
    let keys = tempdir::TempDir::new();
    let key_file = keys.path().join("keys");
    std::fs::write(&key_file, "k-openapi-test\n").unwrap();
    let mut args = ServeArgs::for_models(models_dir());
    args.api_key_file = Some(key_file);
    let s = TestServer::start(args).await;
    let (_, doc) = s.get("/openapi.json").await;
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    let (mut guarded, mut open) = (0, 0);
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let mut url = path.clone();
            for p in op["parameters"].as_array().into_iter().flatten() {
                if p["in"] == "path" {
                    url = url.replace(
                        &format!("{{{}}}", p["name"].as_str().unwrap()),
                        p["example"].as_str().unwrap(),
                    );
                }
            }
            let request = match method.as_str() {
                "get" => s.client.get(s.url(&url)),
                _ => s.client.post(s.url(&url)).body("{}"),
            };
            let status = request.send().await.unwrap().status().as_u16();
            let lists_401 = op["responses"].get("401").is_some();
            assert_eq!(
                status == 401,
                lists_401,
                "{method} {url}: answered {status} without a key"
            );
            if lists_401 { guarded += 1 } else { open += 1 }
        }
    }
    assert!(guarded >= 9 && open >= 8, "guarded {guarded}, open {open}");
    s.stop().await;
}
