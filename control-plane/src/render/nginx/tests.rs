use std::{path::Path, process::Command, time::Duration};

use super::*;

/// Debian's nginx: on `PATH`, or where the package puts it.
fn nginx_bin() -> std::path::PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("nginx"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| "/usr/sbin/nginx".into())
}

fn routes() -> Routes {
    let mut routes = Routes::new();
    routes.insert(
        "orders".into(),
        Route {
            timeout: Some(HumanDuration(Duration::from_secs(2))),
            per_try_timeout: Some(HumanDuration(Duration::from_millis(500))),
            retries: Some(3),
            lb: Some(Lb::LeastRequest),
            weights: [("v1".to_owned(), 90), ("v2".to_owned(), 10)].into(),
            ..Route::default()
        },
    );
    routes.insert(
        "users".into(),
        Route {
            lb: Some(Lb::ConsistentHash),
            hash_header: Some("x-user-id".into()),
            retries: Some(0),
            ..Route::default()
        },
    );
    routes.insert("billing".into(), Route::default());
    routes
}

fn instance(id: &str, address: &str, port: u32, version: Option<&str>) -> Instance {
    Instance {
        id: id.into(),
        address: address.into(),
        port,
        tags: Vec::new(),
        meta: version
            .map(|v| [("version".to_owned(), v.to_owned())].into())
            .unwrap_or_default(),
    }
}

fn instances() -> BTreeMap<String, Vec<Instance>> {
    [
        (
            "orders".to_owned(),
            vec![
                instance("orders-1", "10.0.0.1", 8080, Some("v1")),
                instance("orders-2", "10.0.0.2", 8080, Some("v1")),
                instance("orders-3", "10.0.0.3", 8080, Some("v2")),
                instance("orders-old", "10.0.0.4", 8080, Some("v0")),
            ],
        ),
        (
            "users".to_owned(),
            vec![instance("users-1", "fd00::1", 9000, None)],
        ),
        // billing: no passing instance.
    ]
    .into()
}

/// Runs Debian's `nginx -t` on `conf` with `dir` as its prefix.
fn nginx_test(dir: &Path, conf: &str) -> (bool, String) {
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    std::fs::create_dir_all(dir.join("temp")).unwrap();
    let file = dir.join("nginx.conf");
    std::fs::write(&file, conf).unwrap();
    let nginx = nginx_bin();
    let out = Command::new(&nginx)
        .arg("-t")
        .arg("-p")
        .arg(format!("{}/", dir.display()))
        .arg("-c")
        .arg(&file)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): install Debian's nginx (apt-get install nginx)",
                nginx.display()
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_static_variant_passes_nginx_t() {
    let settings = NginxSettings::standard();
    let conf = settings
        .render(Upstreams::Static, "n1", 4, &routes(), &instances())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ok, output) = nginx_test(dir.path(), &conf);
    assert!(
        ok,
        "nginx -t refused the rendered file:\n{output}\n---\n{conf}"
    );
    assert!(output.contains("test is successful"), "{output}");

    assert!(
        conf.contains("# nginx.conf for node n1, config version 4."),
        "{conf}"
    );
    assert!(
        conf.contains("location /orders/ {\n            proxy_pass http://orders/;"),
        "{conf}"
    );
    // 90 % over two v1 instances, 10 % on the one v2; v0 has no weight.
    assert!(conf.contains("server 10.0.0.1:8080 weight=4500 "), "{conf}");
    assert!(conf.contains("server 10.0.0.2:8080 weight=4500 "), "{conf}");
    assert!(conf.contains("server 10.0.0.3:8080 weight=1000 "), "{conf}");
    assert!(
        conf.contains("# left out: orders-old (in no weighted version or tag)"),
        "{conf}"
    );
    assert!(conf.contains("server [fd00::1]:9000 max_fails"), "{conf}");
    assert!(conf.contains("hash $http_x_user_id consistent;"), "{conf}");
    assert!(conf.contains("least_conn;"), "{conf}");
    assert!(
        conf.contains("random two least_conn;"),
        "billing's default: {conf}"
    );
    assert!(
        conf.contains("server 127.0.0.1:1 down;  # no passing instance"),
        "{conf}"
    );
    // orders: 3 retries in 2s, 500ms a try; users: no retries.
    assert!(conf.contains("proxy_read_timeout 500ms;\n            proxy_next_upstream error timeout;\n            proxy_next_upstream_tries 4;\n            proxy_next_upstream_timeout 2s;"), "{conf}");
    assert!(conf.contains("proxy_next_upstream off;"), "{conf}");
    assert!(!conf.contains("upsync"), "{conf}");
    assert!(!conf.contains("{%") && !conf.contains("{{"), "{conf}");
}

#[test]
fn the_upsync_variant_pulls_each_upstream_from_consul() {
    let settings = NginxSettings::standard();
    let conf = settings
        .render(Upstreams::Upsync, "n1", 4, &routes(), &instances())
        .unwrap();
    for name in ["orders", "users", "billing"] {
        let upstream = block(&conf, &format!("upstream {name} {{"));
        assert!(
            upstream.contains(&format!(
                "upsync 127.0.0.1:8500/v1/health/service/{name} upsync_timeout=6m \
                 upsync_interval=500ms upsync_type=consul_health strong_dependency=off;"
            )),
            "{upstream}"
        );
        let dump = format!("/usr/local/openresty/nginx/conf/servers/servers_{name}.conf;");
        assert!(
            upstream.contains(&format!("upsync_dump_path {dump}")),
            "{upstream}"
        );
        assert!(upstream.contains(&format!("include {dump}")), "{upstream}");
        assert!(
            !upstream.contains("server "),
            "no static server: {upstream}"
        );
        let location = block(&conf, &format!("location /{name}/ {{"));
        assert!(
            location.contains(&format!("proxy_pass http://{name}/;")),
            "{location}"
        );
    }
    assert!(conf.contains("# traffic split: v1=90% v2=10%"), "{conf}");
    assert_eq!(
        conf.matches('{').count(),
        conf.matches('}').count(),
        "{conf}"
    );
}

/// The text from `head` to its matching closing brace.
fn block<'a>(conf: &'a str, head: &str) -> &'a str {
    let start = conf
        .find(head)
        .unwrap_or_else(|| panic!("no {head:?} in:\n{conf}"));
    let mut depth = 0;
    for (k, c) in conf[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &conf[start..=start + k];
                }
            }
            _ => {}
        }
    }
    panic!("{head:?} is never closed")
}

#[test]
fn a_node_without_routes_gets_a_server_that_refuses_every_call() {
    let settings = NginxSettings::standard();
    let conf = settings
        .render(Upstreams::Static, "n2", 0, &Routes::new(), &BTreeMap::new())
        .unwrap();
    assert!(!conf.contains("upstream"), "{conf}");
    let dir = tempfile::tempdir().unwrap();
    let (ok, output) = nginx_test(dir.path(), &conf);
    assert!(ok, "{output}\n{conf}");
}

#[test]
fn a_cookie_nginx_cannot_name_is_refused_naming_the_field() {
    let mut routes = Routes::new();
    routes.insert(
        "users".into(),
        Route {
            lb: Some(Lb::ConsistentHash),
            hash_cookie: Some("session-id".into()),
            ..Route::default()
        },
    );
    let e = NginxSettings::standard()
        .render(Upstreams::Upsync, "n1", 1, &routes, &BTreeMap::new())
        .unwrap_err();
    assert!(
        e.to_string().starts_with("routes.users.hash_cookie:"),
        "{e}"
    );
}

#[test]
fn an_operator_template_is_used_and_its_mistakes_are_named() {
    let mut settings = NginxSettings::standard();
    settings.template =
        Template::parse("{% for s in services %}{{ s.name }}={{ s.tries }}\n{% endfor %}").unwrap();
    let out = settings
        .render(Upstreams::Static, "n1", 1, &routes(), &instances())
        .unwrap();
    assert_eq!(out, "billing=3\norders=4\nusers=1\n");
    settings.template = Template::parse("events {}\n{{ s.nmae }}\n").unwrap();
    let e = settings.check().unwrap_err();
    assert!(e.to_string().contains("line 2"), "{e}");
    assert!(NginxSettings::standard().check().is_ok());
}

#[test]
fn ungrouped_instances_serve_when_no_weighted_group_has_one() {
    let route = Route {
        weights: [("v2".to_owned(), 100)].into(),
        ..Route::default()
    };
    let (servers, skipped) = servers(&route, &[instance("a", "10.0.0.1", 80, Some("v1"))]);
    assert_eq!(servers.len(), 1, "{servers:?}");
    assert!(skipped.is_empty());
    let (servers, skipped) = servers_of_bad_addresses();
    assert!(servers.is_empty());
    assert_eq!(skipped.len(), 2);
}

fn servers_of_bad_addresses() -> (Vec<Value>, Vec<Value>) {
    servers(
        &Route::default(),
        &[
            instance("a", "10.0.0.1;evil", 80, None),
            instance("b", "10.0.0.1", 0, None),
        ],
    )
}

#[test]
fn the_config_version_is_answered_through_nginx_and_the_node_name_is_made_safe() {
    let settings = NginxSettings::standard();
    let conf = settings
        .render(Upstreams::Static, "n1", 4, &routes(), &instances())
        .unwrap();
    let exact = block(&conf, "location = /_mesh/config/4 {");
    assert!(
        exact.contains("return 200 \"node n1 version 4\\n\";"),
        "{exact}"
    );
    assert!(conf.contains("location = /_mesh/config {"), "{conf}");
    let dir = tempfile::tempdir().unwrap();
    let (ok, output) = nginx_test(dir.path(), &conf);
    assert!(ok, "{output}\n{conf}");

    // A name with characters nginx reads specially stays one string.
    let odd = settings
        .render(
            Upstreams::Static,
            "n\"1 $x;",
            4,
            &Routes::new(),
            &BTreeMap::new(),
        )
        .unwrap();
    assert!(
        odd.contains("return 200 \"node n_1__x_ version 4\\n\";"),
        "{odd}"
    );
}

#[test]
fn the_verify_url_asks_nginx_on_a_loopback_address() {
    let url = |listen: &str| verify_url_for(listen);
    let want = |host: &str| Some(format!("http://{host}/_mesh/config/{{version}}"));
    assert_eq!(url("127.0.0.1:8888"), want("127.0.0.1:8888"));
    assert_eq!(url("8080"), want("127.0.0.1:8080"));
    assert_eq!(url("*:80"), want("127.0.0.1:80"));
    assert_eq!(url("0.0.0.0:80 reuseport"), want("127.0.0.1:80"));
    assert_eq!(url("[::]:80"), want("[::1]:80"));
    assert_eq!(url("localhost:81"), want("127.0.0.1:81"));
    assert_eq!(url("10.0.0.5:80"), None, "not reachable on loopback");
    assert_eq!(url("example.com:80"), None);
    let apply = NginxApply::standard();
    assert_eq!(
        apply.verify_url_of(12).as_deref(),
        Some("http://127.0.0.1:8888/_mesh/config/12")
    );
}
