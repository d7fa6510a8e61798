//! The baseline of the side-by-side harness (`benches/side_by_side.sh`): the least a hyper +
//! Redis edge does for a claim and a redemption, to measure kamigate against on the same
//! machine, Redis and load.
//!
//! - `POST /v1/skus/{sku}/claims` `{"order_id"}`: one script of four commands (HGET the
//!   order → SPOP a code → HSET the order → XADD an event), answering the code.
//! - `POST /v1/redeem` `{"code","redeemer","sku"}`: one script (HGET the code's owner →
//!   HSETNX the redemption by this redeemer → XADD an event).
//!
//! No auth, limits, holds, ledger or metrics: that is the point. Usage:
//! `baseline-edge <listen addr> <redis url> [--load <sku> <n>]` (`--load` fills the SKU's set
//! with `n` codes `<sku>-<i>` first, then serves).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use fred::prelude::{Client, ClientLike, Config, LuaInterface, SetsInterface};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

const CLAIM: &str = r#"
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then return existing end
local code = redis.call('SPOP', KEYS[2])
if not code then return false end
redis.call('HSET', KEYS[1], ARGV[1], code)
redis.call('XADD', KEYS[3], '*', 't', 'claim', 'order', ARGV[1], 'code', code)
return code
"#;

const REDEEM: &str = r#"
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if not owner then return 0 end
local first = redis.call('HSETNX', KEYS[2], ARGV[1] .. '|' .. ARGV[2], 1)
redis.call('XADD', KEYS[3], '*', 't', 'redeem', 'code', ARGV[1], 'redeemer', ARGV[2])
return first
"#;

struct Edge {
    redis: Client,
}

fn answer(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res
}

async fn serve(
    edge: Arc<Edge>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(route(&edge, req).await.unwrap_or_else(|e| {
        answer(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": e.details().to_string()}),
        )
    }))
}

async fn route(
    edge: &Edge,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, fred::error::Error> {
    let path = req.uri().path().to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(answer(StatusCode::BAD_REQUEST, json!({"error": "body"}))),
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return Ok(answer(StatusCode::BAD_REQUEST, json!({"error": "json"})));
    };
    let text = |name: &str| body[name].as_str().unwrap_or("").to_owned();
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["", "v1", "skus", sku, "claims"] => {
            let order = text("order_id");
            let keys = vec![
                format!("bl:{{{sku}}}:orders"),
                format!("bl:{{{sku}}}:avail"),
                format!("bl:{{{sku}}}:events"),
            ];
            let code: Option<String> = edge.redis.eval(CLAIM, keys, vec![order.clone()]).await?;
            Ok(match code {
                Some(code) => answer(StatusCode::OK, json!({"order_id": order, "code": code})),
                None => answer(StatusCode::CONFLICT, json!({"error": "sold out"})),
            })
        }
        ["", "v1", "redeem"] => {
            let (code, redeemer) = (text("code"), text("redeemer"));
            let sku = text("sku");
            let keys = vec![
                format!("bl:{{{sku}}}:owners"),
                format!("bl:{{{sku}}}:redeemed"),
                format!("bl:{{{sku}}}:events"),
            ];
            let first: i64 = edge.redis.eval(REDEEM, keys, vec![code, redeemer]).await?;
            Ok(match first {
                1 => answer(StatusCode::OK, json!({"state": "redeemed"})),
                _ => answer(StatusCode::NOT_FOUND, json!({"error": "invalid or used"})),
            })
        }
        _ => Ok(answer(StatusCode::NOT_FOUND, json!({"error": "route"}))),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(listen), Some(url)) = (args.first(), args.get(1)) else {
        eprintln!("usage: baseline-edge <listen addr> <redis url> [--load <sku> <n>]");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse()?;
    let redis = Client::new(Config::from_url(url)?, None, None, None);
    redis.init().await?;
    if let (Some("--load"), Some(sku), Some(n)) =
        (args.get(2).map(String::as_str), args.get(3), args.get(4))
    {
        let n: usize = n.parse()?;
        for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
            let codes: Vec<String> = chunk.iter().map(|i| format!("{sku}-{i}")).collect();
            let _: i64 = redis
                .sadd(format!("bl:{{{sku}}}:avail"), codes.clone())
                .await?;
            // Codes redeemable once claimed: the baseline keeps no order → code link.
            let owners: Vec<(String, String)> =
                codes.into_iter().map(|c| (c, "sold".to_owned())).collect();
            let _: () = fred::interfaces::HashesInterface::hset(
                &redis,
                format!("bl:{{{sku}}}:owners"),
                owners,
            )
            .await?;
        }
    }
    let edge = Arc::new(Edge { redis });
    let listener = TcpListener::bind(listen).await?;
    println!("baseline edge on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let edge = edge.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| serve(edge.clone(), req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
