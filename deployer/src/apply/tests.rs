use std::{
    fs,
    net::TcpListener,
    process::{Child, Command},
    time::Duration,
};

use super::*;

/// Debian's nginx, where the package puts it.
const NGINX: &str = "/usr/sbin/nginx";

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|&a| a.to_owned()).collect()
}

/// A spec for `path` with fake commands that succeed.
fn spec(path: &Path, content: &[u8]) -> ApplySpec {
    ApplySpec {
        path: path.to_string_lossy().into_owned(),
        content: content.to_vec(),
        validate: argv(&["true"]),
        reload: argv(&["true"]),
        verify_url: None,
        verify_timeout: DEFAULT_VERIFY_TIMEOUT,
    }
}

fn failing(message: &str) -> Vec<String> {
    argv(&["sh", "-c", &format!("echo '{message}' >&2; exit 1")])
}

fn root() -> (tempfile::TempDir, ConfigApplier) {
    let dir = tempfile::tempdir().unwrap();
    let applier = ConfigApplier::new(vec![dir.path().to_path_buf()]);
    (dir, applier)
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[tokio::test]
async fn a_good_config_is_written_validated_and_reloaded() {
    let (dir, applier) = root();
    let path = dir.path().join("site.conf");
    let marks = dir.path().join("marks");
    let mut s = spec(&path, b"server {}\n");
    // The validator sees the new file; the reload runs after it.
    s.validate = argv(&[
        "sh",
        "-c",
        &format!("cat {{path}} > {}.validated", marks.display()),
    ]);
    s.reload = argv(&["sh", "-c", &format!("touch {}.reloaded", marks.display())]);
    let applied = applier.apply(s).await.unwrap();
    assert_eq!(
        applied,
        Applied {
            sha256: sha(b"server {}\n"),
            changed: true
        }
    );
    assert_eq!(fs::read(&path).unwrap(), b"server {}\n");
    assert_eq!(
        fs::read(dir.path().join("marks.validated")).unwrap(),
        b"server {}\n"
    );
    assert!(dir.path().join("marks.reloaded").exists());
}

#[tokio::test]
async fn a_failing_validate_restores_the_old_bytes_exactly() {
    let (dir, applier) = root();
    let path = dir.path().join("nginx.conf");
    let old = b"events {}\r\n\x00odd bytes\xff".to_vec();
    fs::write(&path, &old).unwrap();
    let reloaded = dir.path().join("reloaded");
    let mut s = spec(&path, b"broken {");
    s.validate = failing("unexpected end of file, expecting \"}\"");
    s.reload = argv(&["touch", &reloaded.to_string_lossy()]);
    let e = applier.apply(s).await.unwrap_err();
    let message = e.to_string();
    assert!(
        matches!(
            e,
            ApplyError::Failed {
                step: "validate",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(message.contains("unexpected end of file"), "{message}");
    assert!(message.contains("restored"), "{message}");
    assert_eq!(fs::read(&path).unwrap(), old);
    assert!(!reloaded.exists(), "no reload after a failed validate");
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        1,
        "temp files left"
    );
}

#[tokio::test]
async fn a_failing_validate_removes_a_file_that_was_not_there() {
    let (dir, applier) = root();
    let path = dir.path().join("new.conf");
    let mut s = spec(&path, b"broken {");
    s.validate = failing("bad");
    let e = applier.apply(s).await.unwrap_err();
    assert!(e.to_string().contains("removed"), "{e}");
    assert!(!path.exists());
}

#[tokio::test]
async fn a_failing_reload_restores_and_reloads_again() {
    let (dir, applier) = root();
    let path = dir.path().join("nginx.conf");
    fs::write(&path, b"old").unwrap();
    let count = dir.path().join("reloads");
    let mut s = spec(&path, b"new");
    // Fails the first time, succeeds the second (on the old file).
    s.reload = argv(&[
        "sh",
        "-c",
        &format!(
            "echo x >> {c}; grep -q old {{path}} || {{ echo 'reload refused' >&2; exit 1; }}",
            c = count.display()
        ),
    ]);
    let e = applier.apply(s).await.unwrap_err();
    let message = e.to_string();
    assert!(
        matches!(e, ApplyError::Failed { step: "reload", .. }),
        "{e:?}"
    );
    assert!(message.contains("reload refused"), "{message}");
    assert!(message.contains("restored and reloaded"), "{message}");
    assert_eq!(fs::read(&path).unwrap(), b"old");
    assert_eq!(fs::read_to_string(&count).unwrap().lines().count(), 2);
}

#[tokio::test]
async fn a_failing_verify_restores_and_reloads() {
    let (dir, applier) = root();
    let path = dir.path().join("nginx.conf");
    fs::write(&path, b"old").unwrap();
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut s = spec(&path, b"new");
    s.verify_url = Some(format!("http://127.0.0.1:{port}/health"));
    s.verify_timeout = Duration::from_millis(300);
    let e = applier.apply(s).await.unwrap_err();
    assert!(e.to_string().starts_with("verify failed"), "{e}");
    assert_eq!(fs::read(&path).unwrap(), b"old");
}

#[tokio::test]
async fn identical_content_changes_nothing() {
    let (dir, applier) = root();
    let path = dir.path().join("nginx.conf");
    fs::write(&path, b"same").unwrap();
    let mut s = spec(&path, b"same");
    // Neither runs: they would fail.
    s.validate = failing("must not run");
    s.reload = failing("must not run");
    let applied = applier.apply(s).await.unwrap();
    assert_eq!(
        applied,
        Applied {
            sha256: sha(b"same"),
            changed: false
        }
    );
}

#[tokio::test]
async fn a_path_outside_the_roots_is_refused() {
    let (dir, applier) = root();
    let other = tempfile::tempdir().unwrap();
    for path in [
        other.path().join("nginx.conf"),
        dir.path().to_path_buf(),
        PathBuf::from("relative.conf"),
    ] {
        let e = applier.apply(spec(&path, b"x")).await.unwrap_err();
        assert!(
            matches!(e, ApplyError::Invalid { field: "path", .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
    }
    assert_eq!(fs::read_dir(other.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn dot_dot_in_a_path_is_refused() {
    let (dir, applier) = root();
    fs::create_dir(dir.path().join("sites")).unwrap();
    for given in [
        format!("{}/sites/../../escape.conf", dir.path().display()),
        format!("{}/sites/../inside.conf", dir.path().display()),
        format!("{}/./inside.conf", dir.path().display()),
    ] {
        let mut s = spec(dir.path(), b"x");
        s.path = given.clone();
        let e = applier.apply(s).await.unwrap_err();
        assert!(
            matches!(e, ApplyError::Invalid { field: "path", .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains(&given), "{e}");
    }
}

#[tokio::test]
async fn a_symlink_out_of_the_root_is_refused() {
    let (dir, applier) = root();
    let other = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(other.path(), dir.path().join("out")).unwrap();
    let e = applier
        .apply(spec(&dir.path().join("out/nginx.conf"), b"x"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ApplyError::Invalid { field: "path", .. }),
        "{e:?}"
    );
    assert_eq!(fs::read_dir(other.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn content_over_the_limit_and_remote_verify_urls_are_refused() {
    let (dir, applier) = root();
    let path = dir.path().join("nginx.conf");
    let e = applier
        .apply(spec(&path, &vec![b'#'; MAX_CONTENT + 1]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ApplyError::Invalid {
                field: "content",
                ..
            }
        ),
        "{e:?}"
    );
    for url in [
        "http://10.0.0.1:80/",
        "https://127.0.0.1:1/",
        "http://127.0.0.1/",
    ] {
        let mut s = spec(&path, b"x");
        s.verify_url = Some(url.into());
        let e = applier.apply(s).await.unwrap_err();
        assert!(
            matches!(
                e,
                ApplyError::Invalid {
                    field: "verify_url",
                    ..
                }
            ),
            "{e:?}"
        );
    }
    assert!(!path.exists());
}

/// A real nginx, run in the foreground with its prefix in a temp folder;
/// killed when dropped.
struct Nginx {
    child: Child,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master takes its workers with it (SIGKILL would not).
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

fn nginx_conf(dir: &Path, port: u16, answer: &str) -> String {
    let d = dir.display();
    format!(
        "error_log {d}/logs/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n\
         \x20   access_log off;\n\
         \x20   client_body_temp_path {d}/temp/body;\n\
         \x20   proxy_temp_path {d}/temp/proxy;\n\
         \x20   fastcgi_temp_path {d}/temp/fastcgi;\n\
         \x20   uwsgi_temp_path {d}/temp/uwsgi;\n\
         \x20   scgi_temp_path {d}/temp/scgi;\n\
         \x20   server {{\n\
         \x20       listen 127.0.0.1:{port};\n\
         \x20       location / {{ return 200 \"{answer}\"; }}\n\
         \x20   }}\n\
         }}\n"
    )
}

async fn answer(port: u16) -> String {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    match http::get(addr, "/", Duration::from_secs(2), 1024).await {
        Ok((_, body)) => String::from_utf8_lossy(&body).into_owned(),
        Err(e) => format!("no answer: {e}"),
    }
}

/// Polls until nginx answers `want` on 20 new connections in a row, or
/// 10 s pass: after a reload, old workers may take a few more connections
/// with the old file before they stop accepting.
async fn wait_for(port: u16, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut in_a_row = 0;
    while in_a_row < 20 {
        let got = answer(port).await;
        if got == want {
            in_a_row += 1;
            continue;
        }
        in_a_row = 0;
        assert!(
            Instant::now() < deadline,
            "nginx answers {got:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn real_nginx_applies_a_good_config_and_keeps_serving_after_a_broken_one() {
    assert!(
        Path::new(NGINX).is_file(),
        "{NGINX} is missing: install nginx with deploy/scripts/install-test-deps.sh"
    );
    let (dir, applier) = root();
    let d = dir.path();
    fs::create_dir_all(d.join("logs")).unwrap();
    fs::create_dir_all(d.join("temp")).unwrap();
    let conf = d.join("nginx.conf");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    fs::write(&conf, nginx_conf(d, port, "v1")).unwrap();
    let prefix = format!("{}/", d.display());
    let pid = format!("pid {}/nginx.pid;", d.display());
    let _nginx = Nginx {
        child: Command::new(NGINX)
            .args(["-p", &prefix, "-c", &conf.to_string_lossy()])
            .args(["-g", &format!("daemon off; {pid}")])
            .spawn()
            .unwrap(),
    };
    wait_for(port, "v1").await;

    let nginx_argv = |tail: &[&str]| {
        let mut a = argv(&[NGINX, "-p", &prefix, "-c", "{path}", "-g", &pid]);
        a.extend(argv(tail));
        a
    };
    let mut s = spec(&conf, nginx_conf(d, port, "v2").as_bytes());
    s.validate = nginx_argv(&["-t"]);
    s.reload = nginx_argv(&["-s", "reload"]);
    s.verify_url = Some(format!("http://127.0.0.1:{port}/"));
    let applied = applier.apply(s.clone()).await.unwrap();
    assert!(applied.changed);
    // The reload is done once the workers answer with the new file.
    wait_for(port, "v2").await;
    let good = fs::read(&conf).unwrap();

    s.content = b"events {}\nhttp { server { listen 127.0.0.1:1; }\n".to_vec();
    let e = applier.apply(s).await.unwrap_err();
    let message = e.to_string();
    assert!(
        matches!(
            e,
            ApplyError::Failed {
                step: "validate",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(message.contains("unexpected end of file"), "{message}");
    assert_eq!(fs::read(&conf).unwrap(), good);
    assert_eq!(answer(port).await, "v2");
}
