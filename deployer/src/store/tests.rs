use std::{
    fs,
    num::NonZeroUsize,
    path::Path,
    time::{Duration, SystemTime},
};

use sha2::{Digest, Sha256};

use super::*;

const MAX: u64 = 1 << 20;

fn open(dir: &Path, keep: usize) -> Store {
    let limits = Limits {
        max_size: MAX,
        keep: NonZeroUsize::new(keep).unwrap(),
    };
    Store::open(dir, limits).unwrap()
}

/// Deterministic bytes that differ with `seed`.
fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn start(version: &str, data: &[u8]) -> UploadStart {
    UploadStart {
        service: "orders".into(),
        version: version.into(),
        file_name: "orders.jar".into(),
        size: data.len() as u64,
        sha256: sha(data),
        offset: 0,
    }
}

fn begin(store: &Store, start: UploadStart) -> Upload {
    match store.begin(start).unwrap() {
        Begin::Upload(upload) => *upload,
        Begin::Stored(meta) => panic!("stored already: {meta:?}"),
    }
}

/// Sends `data` in 7 KiB chunks and finishes.
fn send(mut upload: Upload, data: &[u8]) -> Result<ArtifactMeta, StoreError> {
    for chunk in data.chunks(7 * 1024) {
        upload = upload.write(chunk)?;
    }
    upload.finish()
}

fn upload(store: &Store, version: &str, data: &[u8]) -> ArtifactMeta {
    send(begin(store, start(version, data)), data).unwrap()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn an_upload_is_stored_whole_with_its_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 5);
    let data = payload(200_000, 1);
    let meta = upload(&store, "2.4.1", &data);

    assert_eq!(meta.service, "orders");
    assert_eq!(meta.version, "2.4.1");
    assert_eq!(meta.file_name, "orders.jar");
    assert_eq!(meta.size, 200_000);
    assert_eq!(meta.sha256, sha(&data));
    assert!(meta.stored_at_ms > 0);
    let path = store.artifact_path(&meta);
    assert_eq!(path, dir.path().join("artifacts/orders/2.4.1/orders.jar"));
    assert_eq!(fs::read(&path).unwrap(), data);
    let on_disk: ArtifactMeta =
        serde_json::from_slice(&fs::read(path.with_file_name("artifact.json")).unwrap()).unwrap();
    assert_eq!(on_disk, meta);
    assert_eq!(
        entries(&dir.path().join("artifacts/orders/2.4.1")),
        ["artifact.json", "orders.jar"]
    );
    assert!(entries(&dir.path().join("uploads")).is_empty());
    assert!(entries(&dir.path().join("staging")).is_empty());
    assert_eq!(
        store.list(Some("orders")).unwrap(),
        std::slice::from_ref(&meta)
    );
    assert_eq!(store.list(None).unwrap(), std::slice::from_ref(&meta));
    assert_eq!(store.get("orders", "2.4.1").unwrap(), Some(meta));
    assert!(store.list(Some("payments")).unwrap().is_empty());
}

#[test]
fn an_upload_cut_short_resumes_from_the_bytes_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 5);
    let data = payload(300_000, 2);
    let sha256 = sha(&data);

    // The stream ends early: the bytes are kept and the error says so.
    let upload = begin(&store, start("1.0.0", &data));
    let e = send(upload, &data[..100_000]).unwrap_err();
    assert!(matches!(
        e,
        StoreError::Incomplete {
            received: 100_000,
            size: 300_000
        }
    ));
    assert!(e.to_string().contains("100000 of 300000 bytes"), "{e}");
    assert_eq!(store.offset("orders", "1.0.0", &sha256).unwrap(), 100_000);

    // The connection drops (the upload is dropped mid-way), and the
    // deployer restarts.
    let mut resumed = start("1.0.0", &data);
    resumed.offset = 100_000;
    let upload = begin(&store, resumed.clone()).write(&data[100_000..150_000]);
    drop(upload);
    drop(store);
    let store = open(dir.path(), 5);
    assert_eq!(store.offset("orders", "1.0.0", &sha256).unwrap(), 150_000);

    // A wrong offset names the one to resume from; nothing is lost.
    let e = store.begin(resumed.clone()).unwrap_err();
    assert!(matches!(
        e,
        StoreError::Offset {
            given: 100_000,
            kept: 150_000
        }
    ));
    assert!(e.to_string().contains("resume from offset 150000"), "{e}");
    let mut other_size = resumed.clone();
    other_size.offset = 150_000;
    other_size.size += 1;
    let e = store.begin(other_size).unwrap_err();
    assert!(e.to_string().starts_with("size: "), "{e}");

    resumed.offset = 150_000;
    let meta = send(begin(&store, resumed), &data[150_000..]).unwrap();
    assert_eq!(fs::read(store.artifact_path(&meta)).unwrap(), data);
    assert_eq!(store.offset("orders", "1.0.0", &sha256).unwrap(), 0);
    assert!(entries(&dir.path().join("uploads")).is_empty());
}

#[test]
fn resuming_what_was_never_started_names_offset_zero() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 5);
    let data = payload(1000, 3);
    let mut s = start("1.0.0", &data);
    s.offset = 10;
    let e = store.begin(s).unwrap_err();
    assert!(
        matches!(e, StoreError::Offset { given: 10, kept: 0 }),
        "{e}"
    );
    assert!(entries(&dir.path().join("uploads")).is_empty());
}

#[test]
fn offset_zero_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 5);
    let data = payload(50_000, 4);
    let upload = begin(&store, start("1.0.0", &data));
    drop(upload.write(&data[..20_000]).unwrap());
    let meta = upload_and_check(&store, &data);
    assert_eq!(meta.size, 50_000);
}

fn upload_and_check(store: &Store, data: &[u8]) -> ArtifactMeta {
    let meta = upload(store, "1.0.0", data);
    assert_eq!(fs::read(store.artifact_path(&meta)).unwrap(), data);
    meta
}

#[test]
fn one_upload_of_a_version_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 5);
    let data = payload(10_000, 5);
    let first = begin(&store, start("1.0.0", &data));
    let e = store.begin(start("1.0.0", &payload(10, 6))).unwrap_err();
    assert!(matches!(e, StoreError::Busy { .. }), "{e}");
    assert!(e.to_string().contains("in progress"), "{e}");
    // Another version of the same service is not held up.
    upload(&store, "2.0.0", &payload(100, 7));
    drop(first);
    upload(&store, "1.0.0", &data);
}

#[test]
fn a_wrong_checksum_stores_nothing_and_discards_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 5);
    let data = payload(80_000, 8);
    let mut s = start("1.0.0", &data);
    s.sha256 = sha(b"something else");
    let expected = s.sha256.clone();
    let e = send(begin(&store, s), &data).unwrap_err();
    let StoreError::Checksum {
        expected: e_expected,
        actual,
    } = &e
    else {
        panic!("{e}");
    };
    assert_eq!(*e_expected, expected);
    assert_eq!(*actual, sha(&data));
    assert!(e.to_string().contains(&expected) && e.to_string().contains(actual));
    assert_eq!(store.get("orders", "1.0.0").unwrap(), None);
    assert!(store.list(None).unwrap().is_empty());
    assert!(entries(&dir.path().join("uploads")).is_empty());
    assert!(entries(&dir.path().join("artifacts")).is_empty());
    assert_eq!(store.offset("orders", "1.0.0", &expected).unwrap(), 0);
}

#[test]
fn sizes_over_the_limit_are_refused_announced_or_sent() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 5);
    let mut s = start("1.0.0", b"x");
    s.size = MAX + 1;
    let e = store.begin(s).unwrap_err();
    assert!(matches!(e, StoreError::TooLarge { max: MAX, .. }), "{e}");
    assert!(e.to_string().starts_with("size: "), "{e}");
    s = start("1.0.0", b"x");
    s.size = 0;
    let e = store.begin(s).unwrap_err();
    assert!(e.to_string().starts_with("size: "), "{e}");

    // More bytes than announced: refused, and the part goes.
    let data = payload(10_000, 9);
    let upload = begin(&store, start("1.0.0", &data[..5000]));
    let e = upload
        .write(&data[..4000])
        .unwrap()
        .write(&data[4000..])
        .unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::TooManyBytes {
                size: 5000,
                received: 10_000
            }
        ),
        "{e}"
    );
    assert!(entries(&dir.path().join("uploads")).is_empty());
    assert!(store.list(None).unwrap().is_empty());
}

#[test]
fn a_stored_version_is_immutable_and_an_identical_upload_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 5);
    let data = payload(4096, 10);
    let meta = upload(&store, "1.0.0", &data);

    match store.begin(start("1.0.0", &data)).unwrap() {
        Begin::Stored(found) => assert_eq!(found, meta),
        Begin::Upload(_) => panic!("an identical artifact is uploaded again"),
    }
    let other = payload(4096, 11);
    let e = store.begin(start("1.0.0", &other)).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "version 1.0.0 of orders exists with sha256 {}; versions are immutable",
            meta.sha256
        )
    );
    assert_eq!(fs::read(store.artifact_path(&meta)).unwrap(), data);
    assert!(entries(&dir.path().join("uploads")).is_empty());
}

#[test]
fn pruning_keeps_the_newest_versions_and_those_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 2);
    for (i, version) in ["1.0.0", "2.0.0", "3.0.0", "4.0.0"].iter().enumerate() {
        upload(&store, version, &payload(1000, i as u8));
    }
    upload(&store, "9.9.9", &payload(10, 1));
    let list: Vec<_> = store.list(Some("orders")).unwrap();
    let versions: Vec<_> = list.iter().map(|m| m.version.as_str()).collect();
    assert_eq!(versions, ["9.9.9", "4.0.0", "3.0.0", "2.0.0", "1.0.0"]);

    let removed = store.prune("orders", &["1.0.0".into()]).unwrap();
    assert_eq!(removed, ["3.0.0", "2.0.0"]);
    let versions: Vec<_> = store
        .list(Some("orders"))
        .unwrap()
        .into_iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(versions, ["9.9.9", "4.0.0", "1.0.0"]);
    assert_eq!(
        entries(&dir.path().join("artifacts/orders")),
        ["1.0.0", "4.0.0", "9.9.9"]
    );
    assert!(entries(&dir.path().join("staging")).is_empty());
    assert_eq!(store.prune("orders", &[]).unwrap(), ["1.0.0"]);
}

type Change = Box<dyn Fn(&mut UploadStart)>;

fn case(
    field: &'static str,
    change: impl Fn(&mut UploadStart) + 'static,
) -> (&'static str, Change) {
    (field, Box::new(change))
}

#[test]
fn bad_names_are_refused_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 5);
    let data = payload(10, 12);
    let long_version = "1".repeat(65);
    let long_file = format!("{}.jar", "a".repeat(125));
    let cases = [
        case("service", |s| s.service = String::new()),
        case("service", |s| s.service = "../etc".into()),
        case("service", |s| s.service = "_mesh".into()),
        case("service", |s| s.service = "mesh-proxy".into()),
        case("service", |s| s.service = "a.b".into()),
        case("service", |s| s.service = "x".repeat(64)),
        case("version", |s| s.version = "..".into()),
        case("version", |s| s.version = ".".into()),
        case("version", |s| s.version = "1/2".into()),
        case("version", |s| s.version = String::new()),
        case("version", move |s| s.version = long_version.clone()),
        case("file_name", |s| s.file_name = ".hidden.jar".into()),
        case("file_name", |s| s.file_name = "lib/a.jar".into()),
        case("file_name", |s| s.file_name = String::new()),
        case("file_name", |s| s.file_name = "artifact.json".into()),
        case("file_name", move |s| s.file_name = long_file.clone()),
        case("sha256", |s| s.sha256 = "abc".into()),
        case("sha256", |s| s.sha256 = "g".repeat(64)),
    ];
    for (field, change) in cases {
        let mut s = start("1.0.0", &data);
        change(&mut s);
        let e = store.begin(s.clone()).unwrap_err();
        assert!(
            matches!(&e, StoreError::Invalid { field: f, .. } if *f == field),
            "{s:?}: {e}"
        );
        assert!(e.to_string().starts_with(&format!("{field}: ")), "{e}");
    }
    // The same rule text as mesh-control's.
    let e = check_service("a.b").unwrap_err().to_string();
    assert_eq!(
        e,
        "service: \"a.b\" has a bad character '.': use letters, digits, '-' and '_'"
    );
    let mut upper = start("1.0-RC_1", &data);
    upper.sha256 = upper.sha256.to_ascii_uppercase();
    assert_eq!(
        send(begin(&store, upper), &data).unwrap().sha256,
        sha(&data)
    );
    assert_eq!(entries(&dir.path().join("artifacts")), ["orders"]);
    assert!(store.list(Some("bad/name")).is_err());
}

#[test]
fn a_full_disk_discards_the_upload() {
    if !Path::new("/dev/full").exists() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 5);
    let data = payload(1000, 13);
    let s = start("1.0.0", &data);
    // The part file is /dev/full, which answers every write with ENOSPC.
    let part = store.part_path(&s.service, &s.version, &s.sha256);
    std::os::unix::fs::symlink("/dev/full", &part).unwrap();
    let e = begin(&store, s).write(&data).unwrap_err();
    assert!(matches!(e, StoreError::DiskFull { .. }), "{e}");
    assert!(e.to_string().starts_with("disk full writing "), "{e}");
    assert!(entries(&dir.path().join("uploads")).is_empty());
}

#[test]
fn stale_uploads_and_staging_leftovers_go_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 5);
    let old = payload(1000, 14);
    let young = payload(1000, 15);
    drop(
        begin(&store, start("1.0.0", &old))
            .write(&old[..10])
            .unwrap(),
    );
    drop(
        begin(&store, start("2.0.0", &young))
            .write(&young[..10])
            .unwrap(),
    );
    let part = store.part_path("orders", "1.0.0", &sha(&old));
    let day_ago = SystemTime::now() - PART_MAX_AGE - Duration::from_secs(60);
    fs::File::options()
        .write(true)
        .open(&part)
        .unwrap()
        .set_modified(day_ago)
        .unwrap();
    fs::create_dir(dir.path().join("staging/orders.3.0.0.abc")).unwrap();
    fs::write(dir.path().join("uploads/.x.json.tmp.1"), b"").unwrap();
    drop(store);

    let store = open(dir.path(), 5);
    assert_eq!(store.offset("orders", "1.0.0", &sha(&old)).unwrap(), 0);
    assert_eq!(store.offset("orders", "2.0.0", &sha(&young)).unwrap(), 10);
    let young_key = part_key("orders", "2.0.0", &sha(&young));
    assert_eq!(
        entries(&dir.path().join("uploads")),
        [format!("{young_key}.json"), format!("{young_key}.part")]
    );
    assert!(entries(&dir.path().join("staging")).is_empty());
}
