//! mesh-control with `api_token`, against a real Consul dev agent: the REST
//! API, the dashboard's event stream and mesh.v1.Control's gRPC calls
//! refuse a caller without the token (401 / UNAUTHENTICATED naming the
//! header) and answer one with it, through meshctl too; the page and
//! `/ready` stay open.

mod support;

use anyhow::Result;
use consul_client::testing::DevAgent;
use mesh_control_plane::{
    app::ControlPlane,
    ctl::{Ctl, IntentionsCtl, Output},
};
use mesh_runtime::metrics::Registry;

const TOKEN: &str = "api-token-0123456789";

async fn replica(agent: &DevAgent) -> Result<ControlPlane> {
    support::replica(agent, "c1", &["--api-token", TOKEN], Registry::new()).await
}

#[tokio::test]
async fn every_api_needs_the_token() -> Result<()> {
    mesh_runtime::install_crypto_provider();
    let agent = DevAgent::start().await;
    let plane = replica(&agent).await?;
    let http = format!("http://{}", plane.http_addr());
    let client = reqwest::Client::new();

    for path in ["/v1/status", "/v1/intentions", "/v1/events"] {
        let refused = client.get(format!("{http}{path}")).send().await?;
        assert_eq!(refused.status(), 401, "{path}");
        let body = refused.text().await?;
        assert!(body.contains("Authorization: Bearer"), "{path}: {body}");
    }
    let ok = client
        .get(format!("{http}/v1/status"))
        .bearer_auth(TOKEN)
        .send()
        .await?;
    assert_eq!(ok.status(), 200);
    for open in ["/ui/", "/ui/app.js"] {
        let page = client.get(format!("{http}{open}")).send().await?;
        assert_eq!(page.status(), 200, "{open}");
    }
    let ready = client.get(format!("{http}/ready")).send().await?;
    assert_ne!(ready.status(), 401);

    let grpc = format!("http://{}", plane.grpc_addr());
    let e = Ctl::connect(&grpc, Output::Json)
        .await?
        .status()
        .await
        .unwrap_err();
    assert!(
        e.message.contains("authorization: Bearer <api_token>"),
        "{}",
        e.message
    );
    let e = Ctl::connect(&grpc, Output::Json)
        .await?
        .with_api_token(Some("not-the-token-0123456789"))?
        .status()
        .await
        .unwrap_err();
    assert!(e.message.contains("wrong api_token"), "{}", e.message);
    let status = Ctl::connect(&grpc, Output::Json)
        .await?
        .with_api_token(Some(TOKEN))?
        .status()
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    assert!(status.contains("\"replica\": \"c1\""), "{status}");

    let e = IntentionsCtl::new(&http, Output::Json)
        .map_err(|e| anyhow::anyhow!(e.message))?
        .list()
        .await
        .unwrap_err();
    assert!(
        e.message.contains("401") || e.message.contains("Bearer"),
        "{}",
        e.message
    );
    IntentionsCtl::new(&http, Output::Json)
        .and_then(|c| c.with_api_token(Some(TOKEN)))
        .map_err(|e| anyhow::anyhow!(e.message))?
        .list()
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    Ok(())
}
