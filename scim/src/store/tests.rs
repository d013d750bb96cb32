//! Store tests: real redb files in a temp dir, writes through the single writer.

use std::sync::Arc;

use serde_json::{json, Value};

use super::directory::deciding_members;
use super::redb::RedbStorage;
use super::*;
use crate::error::ScimType;
use crate::filter::Filter;
use crate::patch::parse_patch_request;
use crate::validate::{validate_resource, Mode};

const USER: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
const GROUP: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";

fn open(dir: &std::path::Path) -> Directory {
    let storage = Arc::new(RedbStorage::open(dir).unwrap());
    Directory::open(storage, Box::new(time::OffsetDateTime::now_utc)).unwrap()
}

fn user(name: &str) -> Value {
    json!({
        "schemas": [USER],
        "userName": name,
        "externalId": format!("ext-{name}"),
        "active": true,
        "emails": [{"type": "work", "value": name, "primary": true}],
    })
}

async fn create(dir: &Directory, rt: ResourceType, body: Value) -> Result<Written, ScimError> {
    let resource = validate_resource(rt, &body, Mode::Create)?;
    dir.write(
        Command::Create {
            rt,
            resource,
            password_hash: None,
        },
        "test",
    )
    .await
}

/// A group named `name` with members of those ids.
fn group(name: &str, members: &[&str]) -> Value {
    let members: Vec<Value> = members.iter().map(|m| json!({"value": m})).collect();
    json!({"schemas": [GROUP], "displayName": name, "members": members})
}

/// The id of a resource created from `body`.
async fn created(dir: &Directory, rt: ResourceType, body: Value) -> String {
    create(dir, rt, body).await.unwrap().id
}

async fn patch(
    dir: &Directory,
    rt: ResourceType,
    id: &str,
    body: Value,
) -> Result<Written, ScimError> {
    let ops = parse_patch_request(&body)?;
    dir.write(
        Command::Patch {
            rt,
            id: id.to_owned(),
            ops,
            password_hash: None,
            if_match: None,
        },
        "test",
    )
    .await
}

fn patch_body(ops: Value) -> Value {
    json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": ops})
}

fn query(dir: &Directory, rt: ResourceType, filter: &str) -> Vec<String> {
    let page = dir
        .query(
            rt,
            &Query {
                filter: Some(Filter::parse(filter).unwrap()),
                ..Query::default()
            },
        )
        .unwrap();
    assert_eq!(page.total, page.records.len());
    page.records
        .iter()
        .map(|r| r.resource["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn member_comparisons_read_only_the_members_they_name_and_judge_as_reading_all() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = open(tmp.path());
    let mut users = Vec::new();
    for name in ["a@x", "b@x", "c@x", "d@x"] {
        users.push(
            create(&dir, ResourceType::User, user(name))
                .await
                .unwrap()
                .id,
        );
    }
    let [a, b, c, d] = [&users[0], &users[1], &users[2], &users[3]];
    let group = |name: &str, members: &[&String]| {
        let members: Vec<Value> = members.iter().map(|id| json!({"value": id})).collect();
        json!({"schemas": [GROUP], "displayName": name, "members": members})
    };
    let g1 = create(&dir, ResourceType::Group, group("g1", &[a, b]))
        .await
        .unwrap()
        .id;
    let g2 = create(&dir, ResourceType::Group, group("g2", &[b, &g1]))
        .await
        .unwrap()
        .id;
    let g3 = create(&dir, ResourceType::Group, group("g3", &[]))
        .await
        .unwrap()
        .id;
    let g4 = create(&dir, ResourceType::Group, group("g4", &[c]))
        .await
        .unwrap()
        .id;
    let upper = a.to_uppercase();
    let filters = [
        format!("members eq \"{a}\""),
        format!("members eq \"{b}\""),
        format!("members.value eq \"{b}\""),
        format!("members[value eq \"{a}\" or value eq \"{c}\"]"),
        format!("members[value eq \"{a}\" and value eq \"{b}\"]"),
        format!("not (members eq \"{a}\")"),
        format!("id eq \"{g1}\" and members eq \"{a}\""),
        format!("id eq \"{g2}\" and members eq \"{a}\""),
        format!("members eq \"{g1}\""),
        format!("members eq \"{d}\""),
        "members eq \"not-an-id\"".to_owned(),
        format!("members eq \"{upper}\""),
        format!("displayName eq \"g1\" or members eq \"{c}\""),
    ];
    let want: [&[&String]; 13] = [
        &[&g1],
        &[&g1, &g2],
        &[&g1, &g2],
        &[&g1, &g4],
        &[],
        &[&g2, &g3, &g4],
        &[&g1],
        &[],
        &[&g2],
        &[],
        &[],
        &[],
        &[&g1, &g4],
    ];
    for (filter, want) in filters.iter().zip(want) {
        let parsed = Filter::parse(filter).unwrap();
        let deciding = deciding_members(&parsed);
        assert!(
            deciding.is_some_and(|ids| !ids.is_empty()),
            "{filter} is decided by the members it names"
        );
        let found = query(&dir, ResourceType::Group, filter);
        // The same filter, made to need every member (no member is named `x`, so the added
        // comparison never holds): the same groups.
        let every = format!("({filter}) or members.display eq \"x\"");
        assert_eq!(deciding_members(&Filter::parse(&every).unwrap()), None);
        assert_eq!(found, query(&dir, ResourceType::Group, &every), "{filter}");
        let want: Vec<String> = want.iter().map(|id| (*id).clone()).collect();
        assert_eq!(found, want, "{filter}");
    }
    // A member group is shown with its name, and found by it.
    assert_eq!(
        query(&dir, ResourceType::Group, "members.display eq \"g1\""),
        vec![g2.clone()]
    );
    assert_eq!(
        query(&dir, ResourceType::Group, "members[display sw \"G\"]"),
        vec![g2.clone()]
    );
    for needs_all in [
        "members pr".to_owned(),
        format!("members ne \"{a}\""),
        format!("members[not (value eq \"{a}\")]"),
        "members[type eq \"User\"]".to_owned(),
        format!("members co \"{a}\""),
    ] {
        let filter = Filter::parse(&needs_all).unwrap();
        assert_eq!(deciding_members(&filter), None, "{needs_all}");
    }
}

#[tokio::test]
async fn creates_reads_and_refuses_duplicate_user_names() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = open(tmp.path());
    let alice = create(&dir, ResourceType::User, user("Alice@Corp.example"))
        .await
        .unwrap();
    let record = dir.get(ResourceType::User, &alice.id).unwrap().unwrap();
    assert_eq!(record.resource["userName"], "Alice@Corp.example");
    assert_eq!(record.resource["meta"]["resourceType"], "User");
    assert_eq!(
        record.resource["meta"]["version"],
        format!("W/\"{}\"", alice.seq)
    );

    let again = create(&dir, ResourceType::User, user("alice@corp.EXAMPLE"))
        .await
        .unwrap_err();
    assert_eq!(again.status, 409);
    assert_eq!(again.scim_type, Some(ScimType::Uniqueness));
    assert_eq!(dir.counts(), (1, 0));
    assert_eq!(
        dir.user_by_name("ALICE@corp.example").map(|u| u.active),
        Some(true)
    );
}

/// A file whose next write, or next sync, fails once armed (a disk full for a moment).
#[derive(Debug)]
struct FullForAMoment {
    file: ::redb::backends::FileBackend,
    armed: Arc<Failing>,
}

/// What fails next, once each.
#[derive(Debug, Default)]
struct Failing {
    write: std::sync::atomic::AtomicBool,
    sync: std::sync::atomic::AtomicBool,
    open: std::sync::atomic::AtomicBool,
    /// Armed: the next opening takes a while (a repair's walk of a large file), saying so in
    /// `opening` as it begins: until `release` is armed (at most 10 s), then saying so in
    /// `opened`.
    slow: std::sync::atomic::AtomicBool,
    opening: std::sync::atomic::AtomicBool,
    release: std::sync::atomic::AtomicBool,
    opened: std::sync::atomic::AtomicBool,
    /// How many databases on the file were closed (dropped).
    closes: std::sync::atomic::AtomicUsize,
}

fn once(armed: &std::sync::atomic::AtomicBool) -> bool {
    armed.swap(false, std::sync::atomic::Ordering::SeqCst)
}

fn arm(armed: &std::sync::atomic::AtomicBool) {
    armed.store(true, std::sync::atomic::Ordering::SeqCst);
}

impl ::redb::StorageBackend for FullForAMoment {
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.file.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        if once(&self.armed.sync) {
            return Err(std::io::Error::other("no space left on device"));
        }
        self.file.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if once(&self.armed.write) {
            return Err(std::io::Error::other("no space left on device"));
        }
        self.file.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        (self.armed.closes).fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.file.close()
    }
}

/// A directory on `directory.redb` in `dir` whose file fails as `armed` says.
fn failing_directory(dir: &std::path::Path, armed: &Arc<Failing>) -> Directory {
    let path = dir.join("directory.redb");
    let armed = armed.clone();
    let reopen = move || {
        if once(&armed.open) {
            return Err(StoreError::Backend("no space left on device".to_owned()));
        }
        if once(&armed.slow) {
            arm(&armed.opening);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !once(&armed.release) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            arm(&armed.opened);
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let file = ::redb::backends::FileBackend::new(file)
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let armed = armed.clone();
        ::redb::Database::builder()
            .create_with_backend(FullForAMoment { file, armed })
            .map_err(|e| StoreError::Backend(e.to_string()))
    };
    let storage =
        Arc::new(RedbStorage::opened_by(Box::new(reopen), super::redb::Upgrade::InPlace).unwrap());
    Directory::open(storage, Box::new(time::OffsetDateTime::now_utc)).unwrap()
}

/// A write that failed (a disk full for a moment) is refused, and changes nothing; once there
/// is room the next writes are taken, without a restart, and both the running directory
/// and the one a restart reads hold exactly what was acknowledged.
#[tokio::test]
async fn writes_go_on_after_a_failed_one_without_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let armed = Arc::new(Failing::default());
    let dir = failing_directory(tmp.path(), &armed);
    let ann = created(&dir, ResourceType::User, user("ann@corp.example")).await;
    arm(&armed.write);
    let bob = create(&dir, ResourceType::User, user("bob@corp.example")).await;
    assert!(bob.is_err(), "a write the disk refused is refused");
    assert!(dir.user_by_name("bob@corp.example").is_none());
    let off = patch_body(json!([{"op": "replace", "value": {"active": false}}]));
    patch(&dir, ResourceType::User, &ann, off).await.unwrap();
    // And when it cannot be opened again at once either: the writer opens it within a second,
    // with no write to open it (an IdP that only looks users up and patches them).
    arm(&armed.write);
    arm(&armed.open);
    let dan = create(&dir, ResourceType::User, user("dan@corp.example")).await;
    assert!(dan.is_err(), "a write the disk refused is refused");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while dir.get(ResourceType::User, &ann).is_err() {
        assert!(std::time::Instant::now() < deadline, "never read again");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let on = patch_body(json!([{"op": "replace", "value": {"active": true}}]));
    patch(&dir, ResourceType::User, &ann, on).await.unwrap();
    // Or the next write opens it, when the writer could not yet.
    arm(&armed.write);
    arm(&armed.open);
    let dan = create(&dir, ResourceType::User, user("dan@corp.example")).await;
    assert!(dan.is_err());
    arm(&armed.open);
    created(&dir, ResourceType::User, user("carl@corp.example")).await;
    let off = patch_body(json!([{"op": "replace", "value": {"active": false}}]));
    patch(&dir, ResourceType::User, &ann, off).await.unwrap();
    drop(dir);

    let dir = open(tmp.path());
    assert_eq!(
        dir.user_by_name("ann@corp.example").map(|u| u.active),
        Some(false)
    );
    assert!(dir.user_by_name("bob@corp.example").is_none());
    assert!(dir.user_by_name("dan@corp.example").is_none());
    assert!(dir.user_by_name("carl@corp.example").is_some());
}

/// The writer opens again a database a failed write left closed with no lock reads wait on,
/// and a close at shutdown waits for that opening, so that the file is left closed cleanly.
#[tokio::test]
async fn an_opening_after_a_failed_write_holds_up_no_read_and_a_close_waits_for_it() {
    let tmp = tempfile::tempdir().unwrap();
    let armed = Arc::new(Failing::default());
    let dir = failing_directory(tmp.path(), &armed);
    let ann = created(&dir, ResourceType::User, user("ann@corp.example")).await;
    arm(&armed.write);
    arm(&armed.open);
    arm(&armed.slow);
    assert!(create(&dir, ResourceType::User, user("bob@corp.example"))
        .await
        .is_err());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !armed.opening.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(std::time::Instant::now() < deadline, "never opened again");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // A read while it opens: refused at once, not held up until the opening is let go.
    let started = std::time::Instant::now();
    assert!(dir.get(ResourceType::User, &ann).is_err());
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(5), "held up {took:?}");
    // A close waits for it (let go a moment after the close begins), and closes what it
    // opened.
    let closed = armed.closes.load(std::sync::atomic::Ordering::SeqCst);
    let releasing = armed.clone();
    let release = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        arm(&releasing.release);
    });
    dir.close();
    let opened = armed.opened.load(std::sync::atomic::Ordering::SeqCst);
    assert!(opened, "closed while the file was being opened");
    assert!(armed.closes.load(std::sync::atomic::Ordering::SeqCst) > closed);
    release.join().unwrap();
}

/// The opening a failed write makes at once, to read back what the file holds, holds up no
/// read either: they are refused meanwhile, not left waiting on a repair's walk of the file
/// (reads of an IdP's lookups run on the proxy's threads, which serve every request too).
#[tokio::test]
async fn the_opening_that_reads_a_failed_write_back_holds_up_no_read() {
    let tmp = tempfile::tempdir().unwrap();
    let armed = Arc::new(Failing::default());
    let dir = failing_directory(tmp.path(), &armed);
    let ann = created(&dir, ResourceType::User, user("ann@corp.example")).await;
    arm(&armed.write);
    arm(&armed.slow);
    let read_while_it_opens = async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !armed.opening.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "never opened again");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let started = std::time::Instant::now();
        let read = dir.get(ResourceType::User, &ann);
        let took = started.elapsed();
        arm(&armed.release);
        (read.is_err(), took)
    };
    let (written, (refused, took)) = tokio::join!(
        create(&dir, ResourceType::User, user("bob@corp.example")),
        read_while_it_opens
    );
    assert!(written.is_err());
    assert!(refused, "read from a database being opened");
    // (One held up would wait the opening's 10 s: it is let go once the read is answered.)
    assert!(took < std::time::Duration::from_secs(5), "held up {took:?}");
    // Open again after it: read as before.
    assert!(dir.get(ResourceType::User, &ann).is_ok());
}

/// A write whose sync failed is not acknowledged though the file, read back, holds it: the
/// kernel may have dropped the pages it could not write (and a sync after it reports nothing),
/// so it may yet be lost. Nothing is written over it: writes are refused until a restart.
#[tokio::test]
async fn a_write_whose_sync_failed_is_not_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let armed = Arc::new(Failing::default());
    let dir = failing_directory(tmp.path(), &armed);
    created(&dir, ResourceType::User, user("ann@corp.example")).await;
    arm(&armed.sync);
    let erin = create(&dir, ResourceType::User, user("erin@corp.example")).await;
    assert!(!once(&armed.sync), "the sync was tried");
    assert!(erin.is_err(), "a write whose sync failed was acknowledged");
    assert!(
        dir.wedged().is_some(),
        "the directory says it needs a restart"
    );
    assert!(dir.user_by_name("erin@corp.example").is_none());
    // The database opened again to read it back holds it: left closed (both closed, the one
    // the write failed on and that one), so that no read ever sees it.
    assert_eq!(armed.closes.load(std::sync::atomic::Ordering::SeqCst), 2);
    let fred = create(&dir, ResourceType::User, user("fred@corp.example")).await;
    assert!(fred.is_err(), "written over erin's write");
    drop(dir);
    let dir = open(tmp.path());
    assert!(dir.user_by_name("fred@corp.example").is_none());
    created(&dir, ResourceType::User, user("fred@corp.example")).await;
}

/// A write whose last step failed may be on disk though refused; when the database could not
/// be read back then, nothing more is written over it: writes are refused until a restart
/// reads it.
#[tokio::test]
async fn a_refused_write_the_disk_kept_is_not_written_over() {
    let tmp = tempfile::tempdir().unwrap();
    let armed = Arc::new(Failing::default());
    let dir = failing_directory(tmp.path(), &armed);
    created(&dir, ResourceType::User, user("ann@corp.example")).await;
    arm(&armed.sync);
    arm(&armed.open);
    let erin = create(&dir, ResourceType::User, user("erin@corp.example")).await;
    assert!(erin.is_err(), "a write whose sync failed is refused");
    for name in ["fred@corp.example", "gina@corp.example"] {
        let refused = create(&dir, ResourceType::User, user(name)).await;
        assert!(refused.is_err(), "{name} written over erin's write");
    }
    drop(dir);
    let dir = open(tmp.path());
    assert!(
        dir.user_by_name("erin@corp.example").is_some(),
        "erin's write was kept"
    );
    assert!(dir.user_by_name("fred@corp.example").is_none());
    assert!(dir.user_by_name("gina@corp.example").is_none());
}

#[tokio::test]
async fn okta_deactivation_is_visible_at_once_and_survives_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let id = {
        let dir = open(tmp.path());
        let bob = create(&dir, ResourceType::User, user("bob@corp.example"))
            .await
            .unwrap();
        let off = patch_body(json!([{"op": "replace", "value": {"active": false}}]));
        patch(&dir, ResourceType::User, &bob.id, off).await.unwrap();
        assert_eq!(
            dir.user_by_name("bob@corp.example").map(|u| u.active),
            Some(false)
        );
        bob.id
    };
    let dir = open(tmp.path());
    assert_eq!(
        dir.user_by_name("bob@corp.example").map(|u| u.active),
        Some(false)
    );
    let record = dir.get(ResourceType::User, &id).unwrap().unwrap();
    assert_eq!(record.resource["active"], false);
    assert_eq!(dir.seq(), 2);

    // A PUT of the profile that leaves `active` out (or null) keeps bob deactivated; only
    // one that says `"active": true` lets him back in.
    let put = |body: Value| Command::Replace {
        rt: ResourceType::User,
        id: id.clone(),
        resource: validate_resource(ResourceType::User, &body, Mode::Replace).unwrap(),
        password_hash: None,
        if_match: None,
    };
    let profile = |active: Value| json!({"schemas": [USER], "userName": "bob@corp.example", "title": "Ops", "active": active});
    for body in [
        json!({"schemas": [USER], "userName": "bob@corp.example"}),
        profile(Value::Null),
    ] {
        dir.write(put(body), "test").await.unwrap();
        assert_eq!(
            dir.user_by_name("bob@corp.example").map(|u| u.active),
            Some(false)
        );
    }
    dir.write(put(profile(json!(true))), "test").await.unwrap();
    assert_eq!(
        dir.user_by_name("bob@corp.example").map(|u| u.active),
        Some(true)
    );
}

/// A store that counts the rows read from it and keeps, of each commit, how many records and
/// memberships it wrote.
#[derive(Default)]
struct Counting {
    inner: memory::MemoryStorage,
    rows_read: std::sync::atomic::AtomicUsize,
    commits: std::sync::Mutex<Vec<(usize, usize)>>,
}

impl Counting {
    /// The rows read and the commits since the last call.
    fn since(&self) -> (usize, Vec<(usize, usize)>) {
        let read = self.rows_read.swap(0, std::sync::atomic::Ordering::SeqCst);
        (read, std::mem::take(&mut *self.commits.lock().unwrap()))
    }
}

impl Storage for Counting {
    fn load(&self, visit: &mut dyn FnMut(Loaded<'_>)) -> Result<(Seq, Row), StoreError> {
        self.inner.load(visit)
    }
    fn records(&self, rt: ResourceType, rows: &[Row]) -> Result<Vec<(Row, Record)>, StoreError> {
        (self.rows_read).fetch_add(rows.len(), std::sync::atomic::Ordering::SeqCst);
        self.inner.records(rt, rows)
    }
    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        let wrote = (batch.records.len(), batch.members.len());
        self.commits.lock().unwrap().push(wrote);
        self.inner.commit(batch)
    }
    fn changes(&self, after: Seq, limit: usize) -> Result<Vec<Change>, StoreError> {
        self.inner.changes(after, limit)
    }
}

/// Adding or removing one member of a large group reads and writes that member's row and the
/// group's record, never the whole group (PRODUCT.md: the same cost with 100,000 members as
/// with 10), whichever way the IdP says it: Okta's filtered remove, Entra's value list.
#[tokio::test]
async fn one_member_of_a_large_group_changes_without_reading_the_group() {
    const MEMBERS: usize = 3_000;
    let storage = Arc::new(Counting::default());
    let dir = Directory::open(storage.clone(), Box::new(time::OffsetDateTime::now_utc)).unwrap();
    let mut ids = Vec::new();
    for i in 0..=MEMBERS {
        ids.push(created(&dir, ResourceType::User, user(&format!("u{i}@x"))).await);
    }
    let (newcomer, members) = ids.split_last().unwrap();
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    let large = created(&dir, ResourceType::Group, group("large", &members)).await;
    assert_eq!(dir.members(&large).len(), MEMBERS);
    storage.since();

    let ops = [
        json!([{"op": "add", "path": "members", "value": [{"value": newcomer}]}]),
        json!([{"op": "remove", "path": format!("members[value eq \"{newcomer}\"]")}]),
        json!([{"op": "Add", "path": "members", "value": [{"value": newcomer}]}]),
        json!([{"op": "Remove", "path": "members", "value": [{"value": newcomer}]}]),
    ];
    for (i, ops) in ops.into_iter().enumerate() {
        patch(&dir, ResourceType::Group, &large, patch_body(ops))
            .await
            .unwrap();
        let (read, commits) = storage.since();
        assert!(read <= 2, "operation {i} read {read} rows");
        assert_eq!(
            commits,
            [(1, 1)],
            "operation {i}: one record, one membership"
        );
        assert_eq!(dir.members(&large).len(), MEMBERS + usize::from(i % 2 == 0));
    }
}

#[tokio::test]
async fn members_change_one_row_at_a_time_and_nest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = open(tmp.path());
    let a = create(&dir, ResourceType::User, user("a@x"))
        .await
        .unwrap()
        .id;
    let b = create(&dir, ResourceType::User, user("b@x"))
        .await
        .unwrap()
        .id;
    let eng = create(
        &dir,
        ResourceType::Group,
        json!({"schemas": [GROUP], "displayName": "Eng", "members": [{"value": a}]}),
    )
    .await
    .unwrap()
    .id;
    let all = create(
        &dir,
        ResourceType::Group,
        json!({"schemas": [GROUP], "displayName": "All", "members": [{"value": eng}]}),
    )
    .await
    .unwrap()
    .id;

    // Okta: add with path members; Entra: Remove with a value list.
    let add = patch_body(json!([{"op": "add", "path": "members", "value": [{"value": b}]}]));
    let written = patch(&dir, ResourceType::Group, &eng, add).await.unwrap();
    assert!(
        written.record.unwrap().resource.get("members").is_none(),
        "members live apart"
    );
    let mut members: Vec<String> = dir.members(&eng).iter().map(|m| m.id.to_string()).collect();
    members.sort();
    let mut want = vec![a.clone(), b.clone()];
    want.sort();
    assert_eq!(members, want);

    let groups: Vec<(String, bool)> = dir
        .groups_of(&b)
        .into_iter()
        .map(|g| (g.display, g.direct))
        .collect();
    assert_eq!(
        groups,
        [("Eng".to_owned(), true), ("All".to_owned(), false)]
    );

    let remove = patch_body(
        json!([{"op": "Remove", "path": "members", "value": [{"value": b, "$ref": null}]}]),
    );
    patch(&dir, ResourceType::Group, &eng, remove)
        .await
        .unwrap();
    assert!(dir.groups_of(&b).is_empty());
    assert_eq!(
        query(
            &dir,
            ResourceType::Group,
            &format!("members[value eq \"{a}\"]")
        ),
        std::slice::from_ref(&eng)
    );

    // A cycle (All inside Eng, Eng inside All) is refused and changes nothing.
    let cycle = patch_body(json!([{"op": "add", "path": "members", "value": [{"value": all}]}]));
    let err = patch(&dir, ResourceType::Group, &eng, cycle)
        .await
        .unwrap_err();
    assert_eq!(err.status, 400);
    assert_eq!(dir.members(&eng).len(), 1);

    // A PUT without `members` keeps them; one with `"members": null` empties the group.
    let put = |body: Value| Command::Replace {
        rt: ResourceType::Group,
        id: all.clone(),
        resource: validate_resource(ResourceType::Group, &body, Mode::Replace).unwrap(),
        password_hash: None,
        if_match: None,
    };
    dir.write(
        put(json!({"schemas": [GROUP], "displayName": "All"})),
        "test",
    )
    .await
    .unwrap();
    assert_eq!(dir.members(&all).len(), 1);
    let emptied = json!({"schemas": [GROUP], "displayName": "All", "members": null});
    dir.write(put(emptied), "test").await.unwrap();
    assert!(dir.members(&all).is_empty());
    assert!(dir.groups_of(&a).iter().all(|g| g.display != "All"));

    // Deleting a user takes it out of every group.
    dir.write(
        Command::Delete {
            rt: ResourceType::User,
            id: a.clone(),
            if_match: None,
        },
        "test",
    )
    .await
    .unwrap();
    assert!(dir.members(&eng).is_empty());
    assert!(dir.get(ResourceType::User, &a).unwrap().is_none());
}

#[tokio::test]
async fn if_match_guards_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = open(tmp.path());
    let c = create(&dir, ResourceType::User, user("c@x")).await.unwrap();
    let stale = Command::Delete {
        rt: ResourceType::User,
        id: c.id.clone(),
        if_match: Some("W/\"999\"".to_owned()),
    };
    assert_eq!(dir.write(stale, "test").await.unwrap_err().status, 412);
    let fresh = Command::Delete {
        rt: ResourceType::User,
        id: c.id.clone(),
        if_match: Some(format!("W/\"{}\"", c.seq)),
    };
    dir.write(fresh, "test").await.unwrap();
}

#[tokio::test]
async fn filters_use_the_index_and_pages_are_stable() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = open(tmp.path());
    let mut ids = Vec::new();
    for i in 0..25 {
        ids.push(
            create(
                &dir,
                ResourceType::User,
                user(&format!("user{i:02}@corp.example")),
            )
            .await
            .unwrap()
            .id,
        );
    }
    assert_eq!(
        query(
            &dir,
            ResourceType::User,
            r#"userName eq "USER07@corp.example""#
        ),
        [ids[7].clone()]
    );
    assert_eq!(
        query(
            &dir,
            ResourceType::User,
            r#"externalId eq "ext-user08@corp.example""#
        ),
        [ids[8].clone()]
    );
    assert!(query(
        &dir,
        ResourceType::User,
        r#"externalId eq "EXT-user08@corp.example""#
    )
    .is_empty());
    assert_eq!(
        query(
            &dir,
            ResourceType::User,
            r#"emails[type eq "work"].value eq "user09@corp.example""#
        ),
        [ids[9].clone()]
    );
    assert_eq!(
        query(&dir, ResourceType::User, r#"userName sw "user1""#).len(),
        10
    );

    let page = |start: usize| {
        dir.query(
            ResourceType::User,
            &Query {
                start_index: start,
                count: Some(10),
                ..Query::default()
            },
        )
        .unwrap()
    };
    let first = page(1);
    assert_eq!(first.total, 25);
    let got: Vec<&str> = first
        .records
        .iter()
        .map(|r| r.resource["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        got,
        ids[..10].iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(page(21).records.len(), 5);
}

/// Every page of an unfiltered list, from each start: the type's live resources in creation
/// order, whatever rows other types and deleted resources hold between them, before and after a
/// restart (which builds the index again from what is stored).
#[tokio::test]
async fn unfiltered_pages_skip_other_types_and_the_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut users = Vec::new();
    {
        let dir = open(tmp.path());
        for i in 0..12 {
            let id = created(
                &dir,
                ResourceType::User,
                user(&format!("p{i}@corp.example")),
            )
            .await;
            if i % 3 == 0 {
                created(&dir, ResourceType::Group, group(&format!("g{i}"), &[])).await;
            }
            if i % 4 == 1 {
                let delete = Command::Delete {
                    rt: ResourceType::User,
                    id,
                    if_match: None,
                };
                dir.write(delete, "test").await.unwrap();
            } else {
                users.push(id);
            }
        }
        assert_pages(&dir, &users);
    }
    assert_pages(&open(tmp.path()), &users);
}

/// What counts as a small read (one the proxy's worker thread may do itself): a page of at
/// most the limit without a filter or sort, or a filter the index narrows to at most the limit.
#[tokio::test]
async fn small_reads_are_pages_and_index_lookups_within_the_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = open(tmp.path());
    for i in 0..3 {
        created(
            &dir,
            ResourceType::User,
            user(&format!("s{i}@corp.example")),
        )
        .await;
    }
    let small = |filter: Option<&str>, count: Option<usize>, limit: usize| {
        let query = Query {
            filter: filter.map(|f| Filter::parse(f).unwrap()),
            count,
            ..Query::default()
        };
        dir.is_small(ResourceType::User, &query, limit)
    };
    assert!(small(None, Some(100), 100), "a page of the limit");
    assert!(!small(None, Some(101), 100), "a page over the limit");
    assert!(!small(None, None, 100), "every user");
    assert!(small(Some(r#"userName eq "s1@corp.example""#), None, 1));
    assert!(small(
        Some(r#"userName eq "s1@corp.example" or userName eq "s2@corp.example""#),
        None,
        2
    ));
    assert!(!small(
        Some(r#"userName eq "s1@corp.example" or userName eq "s2@corp.example""#),
        None,
        1
    ));
    assert!(
        !small(Some(r#"name.familyName co "x""#), None, 100),
        "a filter no index narrows"
    );
    // One the index narrows, but that compares values past a few of one each: a record may
    // hold a thousand emails, or groups, and a filter hundreds of terms.
    let many = (0..5)
        .map(|i| format!(r#"userName co "{i}""#))
        .collect::<Vec<_>>();
    for filter in [
        r#"userName eq "s1@corp.example" and emails co "q""#.to_owned(),
        r#"userName eq "s1@corp.example" and groups.display co "q""#.to_owned(),
        r#"emails eq "s1@corp.example""#.to_owned(),
        r#"userName eq "s1@corp.example" and not (active eq false)"#.to_owned(),
        format!(
            r#"userName eq "s1@corp.example" and ({})"#,
            many.join(" or ")
        ),
    ] {
        assert!(!small(Some(&filter), None, 100), "{filter}");
    }
    let few = (0..3)
        .map(|i| format!(r#"userName co "{i}""#))
        .collect::<Vec<_>>();
    let filter = format!(
        r#"userName eq "s1@corp.example" and ({})"#,
        few.join(" or ")
    );
    assert!(small(Some(&filter), None, 100), "{filter}");
    assert!(small(
        Some(r#"externalId eq "x" and userName eq "s1@corp.example""#),
        None,
        1
    ));
}

fn assert_pages(dir: &Directory, users: &[String]) {
    for start in 1..=users.len() + 2 {
        let page = dir
            .query(
                ResourceType::User,
                &Query {
                    start_index: start,
                    count: Some(4),
                    ..Query::default()
                },
            )
            .unwrap();
        let got: Vec<&str> = page
            .records
            .iter()
            .map(|r| r.resource["id"].as_str().unwrap())
            .collect();
        let want: Vec<&str> = users
            .iter()
            .skip(start - 1)
            .take(4)
            .map(String::as_str)
            .collect();
        assert_eq!(page.total, users.len(), "total, from {start}");
        assert_eq!(got, want, "the page from {start}");
    }
}

#[tokio::test]
async fn concurrent_writes_share_commits_and_all_land() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = Arc::new(open(tmp.path()));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let dir = dir.clone();
        tasks.push(tokio::spawn(async move {
            create(&dir, ResourceType::User, user(&format!("c{i}@x")))
                .await
                .map(|w| w.seq)
        }));
    }
    let mut seqs = Vec::new();
    for task in tasks {
        seqs.push(task.await.unwrap().unwrap());
    }
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 200, "every write gets its own change number");
    assert_eq!(dir.seq(), 200);
    assert_eq!(dir.changes(0, 1000).unwrap().len(), 200);
}

#[tokio::test]
async fn a_database_of_another_version_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let db = ::redb::Database::create(tmp.path().join("directory.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: ::redb::TableDefinition<&str, u64> = ::redb::TableDefinition::new("meta");
            let mut meta = txn.open_table(def).unwrap();
            meta.insert("schema_version", 99).unwrap();
        }
        txn.commit().unwrap();
    }
    let err = RedbStorage::open(tmp.path()).err().unwrap();
    assert!(err.to_string().contains("schema version 99"), "{err}");
}

#[tokio::test]
async fn a_version_1_database_is_upgraded_in_place() {
    use ::redb::ReadableDatabase;
    let tmp = tempfile::tempdir().unwrap();
    let meta: ::redb::TableDefinition<&str, u64> = ::redb::TableDefinition::new("meta");
    {
        let db = ::redb::Database::create(tmp.path().join("directory.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(meta)
            .unwrap()
            .insert("schema_version", 1)
            .unwrap();
        txn.commit().unwrap();
    }
    drop(RedbStorage::open(tmp.path()).unwrap());
    let db = ::redb::Database::open(tmp.path().join("directory.redb")).unwrap();
    let txn = db.begin_read().unwrap();
    let version = txn
        .open_table(meta)
        .unwrap()
        .get("schema_version")
        .unwrap()
        .unwrap()
        .value();
    assert_eq!(version, super::redb::SCHEMA_VERSION);
}

#[tokio::test]
async fn deactivation_and_reactivation_move_the_sign_in_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let epoch = |dir: &Directory| {
        dir.with_subject(SubjectKey::UserName("dana@x"), |v| {
            v.found().map(|v| (v.user.active, v.user.valid_since))
        })
    };
    {
        let dir = open(tmp.path());
        let dana = create(&dir, ResourceType::User, user("dana@x"))
            .await
            .unwrap();
        assert_eq!(epoch(&dir), Some((true, dana.seq)), "created");
        let rename = patch_body(json!([{"op": "replace", "path": "title", "value": "Eng"}]));
        patch(&dir, ResourceType::User, &dana.id, rename)
            .await
            .unwrap();
        assert_eq!(
            epoch(&dir),
            Some((true, dana.seq)),
            "a profile change keeps it"
        );
        let off = patch_body(json!([{"op": "replace", "value": {"active": false}}]));
        let off = patch(&dir, ResourceType::User, &dana.id, off)
            .await
            .unwrap();
        assert_eq!(epoch(&dir), Some((false, off.seq)), "deactivation moves it");
        let on = patch_body(json!([{"op": "replace", "value": {"active": true}}]));
        let on = patch(&dir, ResourceType::User, &dana.id, on).await.unwrap();
        assert_eq!(epoch(&dir), Some((true, on.seq)), "re-activation moves it");
        assert!(on.seq > off.seq);
    }
    let dir = open(tmp.path());
    assert_eq!(
        epoch(&dir).map(|e| e.1),
        Some(4),
        "and it survives a restart"
    );
}

/// The directory's file is open to this process' user alone: it holds names, emails and
/// password hashes.
#[test]
fn the_directory_file_is_open_to_its_user_alone() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let _dir = open(tmp.path());
    let mode = std::fs::metadata(tmp.path().join("directory.redb"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "{mode:o}");
}

/// A PATCH that only sets a password says so in its change, so an auditor can tell what the
/// IdP changed.
#[tokio::test]
async fn a_patch_that_sets_a_password_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = open(tmp.path());
    let ann = created(&dir, ResourceType::User, user("ann@x")).await;
    let written = dir
        .write(
            Command::Patch {
                rt: ResourceType::User,
                id: ann,
                ops: Vec::new(),
                password_hash: Some("$argon2id$not-a-real-hash".to_owned()),
                if_match: None,
            },
            "test",
        )
        .await
        .unwrap();
    let change = dir.changes(written.seq - 1, 10).unwrap().pop().unwrap();
    assert_eq!(change.op, "patch");
    assert_eq!(change.summary, "password set");
}

/// A user without `active` is active, as the gate holds it: created so, or re-activated by
/// `active` removed. Filters read it so, so a client reconciling who is active finds them
/// with `active eq true`, as with any other.
#[tokio::test]
async fn a_user_without_active_is_found_as_active() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = open(tmp.path());
    let mut body = user("erin@x");
    body.as_object_mut().unwrap().remove("active");
    let erin = created(&dir, ResourceType::User, body).await;
    let mut nulled = user("fay@x");
    nulled["active"] = Value::Null;
    let fay = created(&dir, ResourceType::User, nulled).await;
    let gus = created(&dir, ResourceType::User, user("gus@x")).await;
    let off = patch_body(json!([{"op": "replace", "path": "active", "value": false}]));
    patch(&dir, ResourceType::User, &gus, off).await.unwrap();
    assert_eq!(
        query(&dir, ResourceType::User, "active eq false"),
        [gus.as_str()]
    );
    let removed = patch_body(json!([{"op": "remove", "path": "active"}]));
    patch(&dir, ResourceType::User, &gus, removed)
        .await
        .unwrap();
    assert_eq!(
        query(&dir, ResourceType::User, "active eq true"),
        [erin, fay, gus.clone()]
    );
    assert!(query(&dir, ResourceType::User, "active eq false").is_empty());
    // Served as written: a removal leaves `active` unassigned, as the SCIM conformance suite
    // asks.
    let read = dir.get(ResourceType::User, &gus).unwrap().unwrap();
    assert_eq!(read.resource.get("active"), None);
}

#[tokio::test]
async fn the_sign_in_epoch_keeps_its_time_for_bearer_tokens() {
    use std::sync::atomic::{AtomicI64, Ordering};
    let tmp = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicI64::new(1_000));
    let open_at = |clock: &Arc<AtomicI64>| {
        let storage = Arc::new(RedbStorage::open(tmp.path()).unwrap());
        let clock = clock.clone();
        let now = move || {
            time::OffsetDateTime::from_unix_timestamp(clock.load(Ordering::Relaxed)).unwrap()
        };
        Directory::open(storage, Box::new(now)).unwrap()
    };
    let since = |dir: &Directory| {
        dir.with_subject(SubjectKey::UserName("dana@x"), |v| {
            v.found().map(|v| v.user.valid_since_unix)
        })
    };
    {
        let dir = open_at(&clock);
        let dana = created(&dir, ResourceType::User, user("dana@x")).await;
        assert_eq!(since(&dir), Some(1_000), "created");
        clock.store(2_000, Ordering::Relaxed);
        let title = patch_body(json!([{"op": "replace", "path": "title", "value": "Eng"}]));
        patch(&dir, ResourceType::User, &dana, title).await.unwrap();
        assert_eq!(since(&dir), Some(1_000), "a profile change keeps it");
        clock.store(3_000, Ordering::Relaxed);
        let off = patch_body(json!([{"op": "replace", "value": {"active": false}}]));
        patch(&dir, ResourceType::User, &dana, off).await.unwrap();
        assert_eq!(since(&dir), Some(3_000), "deactivation moves it");
    }
    // Read back from the file, by the index's fast path.
    assert_eq!(
        since(&open_at(&clock)),
        Some(3_000),
        "it survives a restart"
    );
}

#[tokio::test]
async fn a_group_never_ends_up_inside_itself_at_any_depth() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = open(tmp.path());
    let add = |member: &str| {
        patch_body(json!([{"op": "add", "path": "members", "value": [{"value": member}]}]))
    };
    let u = created(&dir, ResourceType::User, user("u@x")).await;
    // inner ⊂ middle ⊂ outer, and inner holds a user.
    let inner = created(&dir, ResourceType::Group, group("inner", &[&u])).await;
    let middle = created(&dir, ResourceType::Group, group("middle", &[&inner])).await;
    let outer = created(&dir, ResourceType::Group, group("outer", &[&middle])).await;
    for (into, member) in [
        (&inner, &outer),
        (&inner, &middle),
        (&middle, &outer),
        (&inner, &inner),
    ] {
        let err = patch(&dir, ResourceType::Group, into, add(member))
            .await
            .unwrap_err();
        assert_eq!(err.status, 400, "{member} into {into}");
        assert!(err.detail.contains("cycle"), "{}", err.detail);
    }
    assert_eq!(dir.members(&inner).len(), 1, "nothing changed");
    // Outer holding inner directly too is no cycle; nor is a second group holding outer.
    patch(&dir, ResourceType::Group, &outer, add(&inner))
        .await
        .unwrap();
    let top = created(&dir, ResourceType::Group, group("top", &[&outer])).await;
    let names: Vec<String> = dir.groups_of(&u).into_iter().map(|g| g.display).collect();
    for name in ["inner", "middle", "outer", "top"] {
        assert!(names.iter().any(|n| n == name), "{name}: {names:?}");
    }
    // And a cycle through the group just made is refused too.
    let err = patch(&dir, ResourceType::Group, &inner, add(&top))
        .await
        .unwrap_err();
    assert_eq!(err.status, 400);
}

#[tokio::test]
async fn filters_on_groups_and_member_types_read_them_as_they_are_shown() {
    // Neither a user's `groups` nor a member's `type` is stored: a filter on them reads them
    // as a GET shows them, never an absence that matches nothing.
    let tmp = tempfile::tempdir().unwrap();
    let dir = open(tmp.path());
    let ann = created(&dir, ResourceType::User, user("ann@x")).await;
    let ben = created(&dir, ResourceType::User, user("ben@x")).await;
    create(&dir, ResourceType::User, user("cy@x"))
        .await
        .unwrap();
    let ops = created(&dir, ResourceType::Group, group("ops", &[&ben])).await;
    let eng = created(&dir, ResourceType::Group, group("eng", &[&ann, &ops])).await;
    let sorted = |mut ids: Vec<String>| {
        ids.sort();
        ids
    };
    let both = sorted(vec![ann.clone(), ben.clone()]);
    let cases: [(ResourceType, String, Vec<String>); 6] = [
        (
            ResourceType::User,
            format!("groups.value eq \"{eng}\""),
            both.clone(),
        ),
        (
            ResourceType::User,
            format!("groups[value eq \"{eng}\" and type eq \"direct\"]"),
            vec![ann.clone()],
        ),
        (
            ResourceType::User,
            "groups.display eq \"OPS\"".to_owned(),
            vec![ben.clone()],
        ),
        (
            ResourceType::User,
            "not (groups pr)".to_owned(),
            query(&dir, ResourceType::User, "userName eq \"cy@x\""),
        ),
        (
            ResourceType::Group,
            "members.type eq \"Group\"".to_owned(),
            vec![eng.clone()],
        ),
        (
            ResourceType::Group,
            "members[type eq \"User\"]".to_owned(),
            sorted(vec![eng.clone(), ops.clone()]),
        ),
    ];
    for (rt, filter, want) in cases {
        assert_eq!(sorted(query(&dir, rt, &filter)), sorted(want), "{filter}");
    }
}

#[tokio::test]
async fn a_user_left_alone_with_a_shared_identifier_moves_the_sign_in_epoch() {
    // Two users share an email: a session signed in by it names both and is refused. When one
    // of them gives the email up (or is deleted), it names the other alone: that session must
    // not pass to them.
    let tmp = tempfile::tempdir().unwrap();
    let dir = open(tmp.path());
    let epoch = |name| {
        dir.with_subject(SubjectKey::UserName(name), |v| {
            v.found().map(|v| v.user.valid_since)
        })
    };
    let sharing = |name: &str| {
        let mut body = user(name);
        body["emails"] = json!([{"value": name, "primary": true}, {"value": "team@x"}]);
        body["externalId"] = json!("shared");
        body
    };
    let bob = create(&dir, ResourceType::User, sharing("bob@x"))
        .await
        .unwrap();
    let carol = create(&dir, ResourceType::User, sharing("carol@x"))
        .await
        .unwrap();
    let dan = create(&dir, ResourceType::User, user("dan@x"))
        .await
        .unwrap();
    assert_eq!(epoch("carol@x"), Some(carol.seq));
    // Bob gives up the shared email: carol holds it alone now.
    let drop_email = patch_body(json!([{"op": "remove", "path": "emails[value eq \"team@x\"]"}]));
    let dropped = patch(&dir, ResourceType::User, &bob.id, drop_email)
        .await
        .unwrap();
    assert_eq!(epoch("carol@x"), Some(dropped.seq), "a released email");
    assert_eq!(
        epoch("bob@x"),
        Some(bob.seq),
        "the one who gave it up keeps his"
    );
    // The change names carol: her sessions ended by it, not by a change to her.
    let change = dir.changes(dropped.seq - 1, 1).unwrap().pop().unwrap();
    assert!(
        change.summary.contains(&format!(
            ", sessions of [{}] ended (an identifier they shared was given up)",
            carol.id
        )),
        "{change:?}"
    );
    // Bob is deleted: the externalId they shared is carol's alone.
    dir.write(
        Command::Delete {
            rt: ResourceType::User,
            id: bob.id.clone(),
            if_match: None,
        },
        "test",
    )
    .await
    .unwrap();
    let after = epoch("carol@x").unwrap();
    assert!(after > dropped.seq, "a released externalId");
    assert_eq!(
        epoch("dan@x"),
        Some(dan.seq),
        "a user holding neither is left as he was"
    );
}

#[tokio::test]
async fn a_user_found_by_a_new_identifier_moves_the_sign_in_epoch() {
    // A deleted user's session is looked up by the name it signed in with: when another user
    // takes that name (or email, or externalId), the session must not become theirs.
    let tmp = tempfile::tempdir().unwrap();
    let dir = open(tmp.path());
    let epoch =
        |dir: &Directory, key| dir.with_subject(key, |v| v.found().map(|v| v.user.valid_since));
    let bob = create(&dir, ResourceType::User, user("bob@x"))
        .await
        .unwrap();
    let mut last = bob.seq;
    let steps = [
        // (operations, a new identifier?)
        (
            json!([{"op": "replace", "path": "title", "value": "Eng"}]),
            false,
        ),
        (
            json!([{"op": "replace", "path": "userName", "value": "BOB@x"}]),
            false,
        ),
        (
            json!([{"op": "add", "path": "emails", "value": [{"value": "Bob@X"}]}]),
            false,
        ),
        (
            json!([{"op": "add", "path": "emails", "value": [{"value": "alice@x"}]}]),
            true,
        ),
        (
            json!([{"op": "remove", "path": "emails[value eq \"alice@x\"]"}]),
            false,
        ),
        (
            json!([{"op": "replace", "path": "externalId", "value": "00u1"}]),
            true,
        ),
        (
            json!([{"op": "replace", "path": "externalId", "value": "00u1"}]),
            false,
        ),
        (json!([{"op": "remove", "path": "externalId"}]), false),
        (
            json!([{"op": "replace", "path": "userName", "value": "alice@x"}]),
            true,
        ),
    ];
    for (ops, moves) in steps {
        let what = ops.to_string();
        let written = patch(&dir, ResourceType::User, &bob.id, patch_body(ops))
            .await
            .unwrap();
        let now = epoch(&dir, SubjectKey::UserName("alice@x"))
            .or_else(|| epoch(&dir, SubjectKey::UserName("bob@x")))
            .unwrap();
        if moves {
            assert_eq!(now, written.seq, "{what} moves it");
            last = now;
        } else {
            assert_eq!(now, last, "{what} keeps it");
        }
    }
}

#[tokio::test]
async fn committed_changes_reach_the_sink_before_the_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = Arc::new(RedbStorage::open(tmp.path()).unwrap());
    let seen: Arc<std::sync::Mutex<Vec<Change>>> = Arc::default();
    let sink = {
        let seen = seen.clone();
        Box::new(move |changes: &[Change]| seen.lock().unwrap().extend_from_slice(changes))
    };
    let sinks = Sinks {
        changes: Some(sink),
        entries: None,
    };
    let dir = Directory::open_with_sinks(storage, Box::new(time::OffsetDateTime::now_utc), sinks)
        .unwrap();
    let a = create(&dir, ResourceType::User, user("a@x")).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 1);
    // A write that fails commits nothing and reports nothing.
    create(&dir, ResourceType::User, user("a@x"))
        .await
        .unwrap_err();
    dir.write(
        Command::Delete {
            rt: ResourceType::User,
            id: a.id.clone(),
            if_match: None,
        },
        "okta",
    )
    .await
    .unwrap();
    let seen = seen.lock().unwrap();
    let ops: Vec<(&str, &str, &str)> = seen
        .iter()
        .map(|c| (c.op.as_str(), c.actor.as_str(), c.id.as_str()))
        .collect();
    assert_eq!(
        ops,
        [
            ("create", "test", a.id.as_str()),
            ("delete", "okta", a.id.as_str())
        ]
    );
    assert!(seen[0].seq < seen[1].seq);
}

#[tokio::test]
async fn names_fold_as_authorization_rules_fold_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = open(tmp.path());
    // A final capital sigma: `str::to_lowercase` would fold it to `ς`, the rules to `σ`.
    create(&dir, ResourceType::User, user("ΟΔΥΣΣΕΥΣ"))
        .await
        .unwrap();
    let rule_spelling = portcullis_policy::fold("ΟΔΥΣΣΕΥΣ");
    assert!(dir.user_by_name(&rule_spelling).is_some());
    assert!(dir.user_by_name("Οδυσσευσ").is_some());
    assert_eq!(
        query(&dir, ResourceType::User, r#"userName eq "οδυσσευσ""#).len(),
        1
    );
    // A second user whose name folds to the same string is the same name.
    let again = create(&dir, ResourceType::User, user("οδυσσευσ")).await;
    assert_eq!(again.unwrap_err().scim_type, Some(ScimType::Uniqueness));
}

/// What looking `key` up in `dir` finds, in words.
fn lookup(dir: &Directory, key: SubjectKey<'_>) -> String {
    dir.with_subject(key, |l| match l {
        Lookup::Found(v) => format!("found {}", v.user.user_name),
        Lookup::Unknown => "unknown".to_owned(),
        Lookup::Ambiguous(n) => format!("ambiguous {n}"),
        Lookup::Deleted => "deleted".to_owned(),
    })
}

#[tokio::test]
async fn a_deleted_user_stays_known_as_deleted_across_restarts_until_someone_takes_the_name() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = [
        SubjectKey::UserName("Dana@X"),
        SubjectKey::Email("DANA@x"),
        SubjectKey::ExternalId("ext-dana@x"),
    ];
    {
        let dir = open(tmp.path());
        let dana = create(&dir, ResourceType::User, user("dana@x"))
            .await
            .unwrap();
        let gid =
            json!({"schemas": [GROUP], "displayName": "eng", "members": [{"value": dana.id}]});
        create(&dir, ResourceType::Group, gid).await.unwrap();
        for key in keys {
            assert_eq!(lookup(&dir, key), "found dana@x", "{key:?}");
        }
        assert_eq!(
            lookup(&dir, SubjectKey::ExternalId("EXT-dana@x")),
            "unknown"
        );
        let delete = Command::Delete {
            rt: ResourceType::User,
            id: dana.id.clone(),
            if_match: None,
        };
        dir.write(delete, "test").await.unwrap();
        for key in keys {
            assert_eq!(lookup(&dir, key), "deleted", "{key:?}");
        }
        // Gone as a resource: not found by id, not listed, not a member.
        assert!(dir.get(ResourceType::User, &dana.id).unwrap().is_none());
        assert!(query(&dir, ResourceType::User, "userName eq \"dana@x\"").is_empty());
        assert_eq!(dir.counts(), (0, 1));
        // Deleting it again is a 404, as for any id that is gone.
        let again = Command::Delete {
            rt: ResourceType::User,
            id: dana.id,
            if_match: None,
        };
        assert_eq!(dir.write(again, "test").await.unwrap_err().status, 404);
    }
    let dir = open(tmp.path());
    for key in keys {
        assert_eq!(lookup(&dir, key), "deleted", "after a restart: {key:?}");
    }
    assert_eq!(dir.counts(), (0, 1));
    // Someone new takes the name: they are who it names now.
    create(&dir, ResourceType::User, user("dana@x"))
        .await
        .unwrap();
    for key in keys {
        assert_eq!(lookup(&dir, key), "found dana@x", "{key:?}");
    }
    // Two users with one email: ambiguous, never a guess.
    let mut twin = user("twin@x");
    twin["emails"] = json!([{"value": "dana@x"}]);
    create(&dir, ResourceType::User, twin).await.unwrap();
    assert_eq!(lookup(&dir, SubjectKey::Email("dana@x")), "ambiguous 2");
}

#[tokio::test]
async fn what_a_renamed_user_was_found_by_stays_known_as_no_stranger_s_across_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let former = [
        SubjectKey::UserName("Dana@X"),
        SubjectKey::Email("dana@x"),
        SubjectKey::ExternalId("ext-dana@x"),
    ];
    {
        let dir = open(tmp.path());
        let dana = created(&dir, ResourceType::User, user("dana@x")).await;
        let (rows, _) = dir.counts();
        // The IdP renames her: a new login, email and externalId, as after a marriage.
        let rename = patch_body(json!([{"op": "replace", "value": {
            "userName": "dora@x", "externalId": "ext-dora@x",
            "emails": [{"type": "work", "value": "dora@x", "primary": true}],
        }}]));
        let written = patch(&dir, ResourceType::User, &dana, rename)
            .await
            .unwrap();
        for key in former {
            assert_eq!(lookup(&dir, key), "deleted", "{key:?}");
        }
        assert_eq!(lookup(&dir, SubjectKey::UserName("dora@x")), "found dora@x");
        // Still one user, as SCIM shows it; the change says what was kept.
        assert_eq!(dir.counts().0, rows);
        let changes = dir.changes(written.seq - 1, 10).unwrap();
        assert!(
            changes[0].summary.ends_with("former identifiers kept"),
            "{changes:?}"
        );
        // A change that gives up nothing keeps nothing more.
        let retitle = patch_body(json!([{"op": "replace", "path": "title", "value": "Engineer"}]));
        let written = patch(&dir, ResourceType::User, &dana, retitle)
            .await
            .unwrap();
        let changes = dir.changes(written.seq - 1, 10).unwrap();
        assert!(!changes[0].summary.contains("former"), "{changes:?}");
        // Given up again and again (two provisioning apps' mappings at odds, an edit undone):
        // kept once each, not once more at each change.
        let mut kept = Vec::new();
        for id in ["ext-dana@x", "ext-dora@x", "ext-dana@x", "ext-dora@x"] {
            let flip = patch_body(json!([{"op": "replace", "path": "externalId", "value": id}]));
            let written = patch(&dir, ResourceType::User, &dana, flip).await.unwrap();
            let changes = dir.changes(written.seq - 1, 10).unwrap();
            kept.push(changes[0].summary.contains("former identifiers kept"));
        }
        assert_eq!(kept, [true, false, false, false]);
    }
    let dir = open(tmp.path());
    for key in former {
        assert_eq!(lookup(&dir, key), "deleted", "after a restart: {key:?}");
    }
    // Someone new takes the old name: they are who it names now.
    created(&dir, ResourceType::User, user("dana@x")).await;
    for key in former {
        assert_eq!(lookup(&dir, key), "found dana@x", "{key:?}");
    }
}

/// Holds entries as an [`EntrySink`] is told of them.
#[derive(Default)]
struct Held(std::sync::Mutex<std::collections::BTreeMap<(String, String), String>>);

impl EntrySink for Held {
    fn load(&self, entries: Vec<Entry>) {
        let mut held = self.0.lock().unwrap();
        held.clear();
        drop(held);
        self.apply(&entries);
    }

    fn apply(&self, entries: &[Entry]) {
        let mut held = self.0.lock().unwrap();
        for e in entries {
            let key = (e.kind.clone(), e.key.clone());
            match &e.value {
                Some(v) => held.insert(key, v.clone()),
                None => held.remove(&key),
            };
        }
    }
}

fn entry(key: &str, value: Option<&str>) -> Entry {
    Entry {
        kind: "session".to_owned(),
        key: key.to_owned(),
        value: value.map(str::to_owned),
    }
}

#[tokio::test]
async fn entries_are_kept_in_order_and_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let open = |held: &Arc<Held>| {
        let storage = Arc::new(RedbStorage::open(tmp.path()).unwrap());
        let sinks = Sinks {
            changes: None,
            entries: Some(held.clone()),
        };
        Directory::open_with_sinks(storage, Box::new(time::OffsetDateTime::now_utc), sinks).unwrap()
    };
    let held = Arc::new(Held::default());
    let dir = open(&held);
    let before = dir.seq();
    let put = dir
        .write(
            Command::Put(vec![entry("a", Some("1")), entry("b", Some("2"))]),
            "sessions",
        )
        .await
        .unwrap();
    // Held before the write is answered, under a sequence number of its own.
    assert_eq!(put.seq, before + 1);
    assert_eq!(held.0.lock().unwrap().len(), 2);
    dir.write(
        Command::Put(vec![entry("a", None), entry("b", Some("3"))]),
        "sessions",
    )
    .await
    .unwrap();
    let now: Vec<_> = held.0.lock().unwrap().clone().into_iter().collect();
    let want = vec![(("session".to_owned(), "b".to_owned()), "3".to_owned())];
    assert_eq!(now, want);
    drop(dir);

    let reopened = Arc::new(Held::default());
    let dir = open(&reopened);
    let now: Vec<_> = reopened.0.lock().unwrap().clone().into_iter().collect();
    assert_eq!(now, want);
    assert_eq!(dir.seq(), before + 2);
}

/// Entries beside the directory (a session begun or used) move its sequence but not its
/// standing: only a change to a resource or a membership wakes those who judge open
/// connections again, or every sign-in would have them all judged again.
#[tokio::test]
async fn entries_do_not_move_the_directory_s_standing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = open(tmp.path());
    let mut woken = dir.subscribe();
    woken.borrow_and_update();
    let standing = dir.standing_seq();
    let put = Command::Put(vec![entry("a", Some("1"))]);
    let put = dir.write(put, "sessions").await.unwrap();
    assert_eq!(dir.visible_seq(), put.seq);
    assert_eq!(dir.standing_seq(), standing);
    assert!(!woken.has_changed().unwrap());
    let alice = create(&dir, ResourceType::User, user("alice@x.test"))
        .await
        .unwrap();
    assert_eq!(dir.standing_seq(), alice.seq);
    assert!(woken.has_changed().unwrap());
}

const AGENT: &str = "urn:ietf:params:scim:schemas:core:2.0:Agent";
const APPLICATION: &str = "urn:ietf:params:scim:schemas:core:2.0:AgenticApplication";
const AGENT_EXT: &str = crate::schema::PORTCULLIS_AGENT_SCHEMA;

/// A directory in memory on a clock the test sets (Unix seconds), from `start`.
fn on_clock(start: i64) -> (Directory, Arc<std::sync::atomic::AtomicI64>) {
    use std::sync::atomic::{AtomicI64, Ordering};
    let clock = Arc::new(AtomicI64::new(start));
    let now = {
        let clock = clock.clone();
        move || time::OffsetDateTime::from_unix_timestamp(clock.load(Ordering::Relaxed)).unwrap()
    };
    let storage = Arc::new(crate::store::memory::MemoryStorage::default());
    (Directory::open(storage, Box::new(now)).unwrap(), clock)
}

fn agent(name: &str, owners: &[&str], applications: &[&str], expires: Option<&str>) -> Value {
    let links = |ids: &[&str]| {
        ids.iter()
            .map(|id| json!({"value": id}))
            .collect::<Vec<_>>()
    };
    let mut extension = json!({"owners": links(owners), "applications": links(applications)});
    if let Some(at) = expires {
        extension["expires"] = json!(at);
    }
    json!({
        "schemas": [AGENT, AGENT_EXT],
        "name": name,
        "externalId": format!("client-{name}"),
        "active": true,
        AGENT_EXT: extension,
    })
}

fn standing(dir: &Directory, name: &str) -> Option<Result<(), AgentRefusal>> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    dir.with_agent(AgentKey::Name(name), now, |found| match found {
        AgentLookup::Found(view) => Some(view.standing),
        _ => None,
    })
}

fn set_active(active: bool) -> Value {
    patch_body(json!([{"op": "replace", "path": "active", "value": active}]))
}

/// Two agents share an `externalId` (it need not be unique): a token of that client names
/// both and is refused. When one gives it up (or is deleted), it names the other alone: a
/// token issued before must not pass to it.
#[tokio::test]
async fn an_agent_left_alone_with_a_shared_external_id_takes_no_token_from_before() {
    use std::sync::atomic::Ordering;
    let (dir, clock) = on_clock(1_000);
    let bob = created(&dir, ResourceType::User, user("bob@x")).await;
    let sharing = |name: &str| {
        let mut body = agent(name, &[&bob], &[], None);
        body["externalId"] = json!("client-x");
        body
    };
    let since = |name: &str| {
        dir.with_agent(AgentKey::Name(name), 0, |found| match found {
            AgentLookup::Found(view) => view.agent.valid_since_unix,
            _ => 0,
        })
    };
    let first = created(&dir, ResourceType::Agent, sharing("first")).await;
    created(&dir, ResourceType::Agent, sharing("second")).await;
    let third = created(&dir, ResourceType::Agent, sharing("third")).await;
    created(
        &dir,
        ResourceType::Agent,
        agent("other", &[&bob], &[], None),
    )
    .await;
    assert_eq!(since("second"), 1_000);
    // The first gives it up: the second and third still share it, and are dated anew.
    clock.store(2_000, Ordering::Relaxed);
    let give_up = patch_body(json!([{"op": "replace", "path": "externalId", "value": "client-y"}]));
    patch(&dir, ResourceType::Agent, &first, give_up)
        .await
        .unwrap();
    assert_eq!(since("second"), 2_000, "a released externalId");
    assert_eq!(
        since("other"),
        1_000,
        "one holding none of it is left as it was"
    );
    // The third is deleted: the second holds it alone.
    clock.store(3_000, Ordering::Relaxed);
    dir.write(
        Command::Delete {
            rt: ResourceType::Agent,
            id: third,
            if_match: None,
        },
        "test",
    )
    .await
    .unwrap();
    assert_eq!(since("second"), 3_000, "deleted, it released it");
    let found = dir.with_agent(AgentKey::ExternalId("client-x"), 0, |found| match found {
        AgentLookup::Found(view) => view.agent.name.to_string(),
        _ => String::new(),
    });
    assert_eq!(found, "second");
}

/// An agent whose `expires` had passed stands again once it is put later or taken away, as a
/// re-activated one does: its tokens from before are not its own. Moved within the future, or
/// while it has not passed, it stays.
#[tokio::test]
async fn an_agent_whose_passed_expiry_is_put_later_is_dated_anew() {
    use std::sync::atomic::Ordering;
    let (dir, clock) = on_clock(1_000);
    let bob = created(&dir, ResourceType::User, user("bob@x")).await;
    let at = |unix: i64| {
        time::OffsetDateTime::from_unix_timestamp(unix)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let helper = created(
        &dir,
        ResourceType::Agent,
        agent("helper", &[&bob], &[], Some(&at(1_500))),
    )
    .await;
    let since = || {
        dir.with_agent(AgentKey::Name("helper"), 0, |found| match found {
            AgentLookup::Found(view) => view.agent.valid_since_unix,
            _ => 0,
        })
    };
    assert_eq!(since(), 1_000, "created");
    let expires = |value: Value| {
        let path = format!("{AGENT_EXT}:expires");
        patch_body(json!([{"op": "replace", "path": path, "value": value}]))
    };
    let remove = patch_body(json!([{"op": "remove", "path": format!("{AGENT_EXT}:expires")}]));
    for (unix, change, since_then, what) in [
        (
            1_100,
            expires(json!(at(1_800))),
            1_000,
            "put later before it passed",
        ),
        (
            2_000,
            expires(json!(at(3_000))),
            2_000,
            "put later once passed",
        ),
        (
            2_100,
            expires(json!(at(4_000))),
            2_000,
            "put later again, not passed",
        ),
        (4_500, remove.clone(), 4_500, "taken away once passed"),
        (4_600, expires(json!(at(4_550))), 4_500, "put in the past"),
        (4_700, remove, 4_700, "taken away once passed again"),
    ] {
        clock.store(unix, Ordering::Relaxed);
        patch(&dir, ResourceType::Agent, &helper, change)
            .await
            .unwrap();
        assert_eq!(since(), since_then, "{what}");
    }
}

#[tokio::test]
async fn an_agent_stands_only_while_its_owner_chain_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = open(tmp.path());
    let alice = create(&dir, ResourceType::User, user("alice"))
        .await
        .unwrap()
        .id;
    let bob = create(&dir, ResourceType::User, user("bob"))
        .await
        .unwrap()
        .id;
    let eng = create(
        &dir,
        ResourceType::Group,
        json!({"schemas": [GROUP], "displayName": "eng", "members": [{"value": alice}]}),
    )
    .await
    .unwrap()
    .id;
    let app = create(
        &dir,
        ResourceType::AgenticApplication,
        json!({"schemas": [APPLICATION], "name": "Helpdesk"}),
    )
    .await
    .unwrap()
    .id;
    let (user_rt, group_rt, app_rt) = (
        ResourceType::User,
        ResourceType::Group,
        ResourceType::AgenticApplication,
    );
    create(
        &dir,
        ResourceType::Agent,
        agent("by-group", &[&eng], &[&app], None),
    )
    .await
    .unwrap();
    create(
        &dir,
        ResourceType::Agent,
        agent("by-bob", &[&bob], &[], None),
    )
    .await
    .unwrap();
    let past = "2020-01-01T00:00:00Z";
    create(
        &dir,
        ResourceType::Agent,
        agent("old", &[&bob], &[], Some(past)),
    )
    .await
    .unwrap();
    let nobody = "00000000-0000-4000-8000-000000000000";
    create(
        &dir,
        ResourceType::Agent,
        agent("orphan", &[nobody], &[], None),
    )
    .await
    .unwrap();
    assert_eq!(standing(&dir, "BY-GROUP"), Some(Ok(())));
    assert_eq!(standing(&dir, "by-bob"), Some(Ok(())));
    assert_eq!(standing(&dir, "old"), Some(Err(AgentRefusal::Expired)));
    assert_eq!(
        standing(&dir, "orphan"),
        Some(Err(AgentRefusal::NoActiveOwner))
    );
    // An application link that names no id ties the agent to an application it cannot be
    // sure of: refused, not taken as no application.
    let mut unsure = agent("unsure", &[&bob], &[], None);
    unsure[AGENT_EXT]["applications"] = json!([{"display": "Helpdesk"}]);
    create(&dir, ResourceType::Agent, unsure).await.unwrap();
    assert_eq!(
        standing(&dir, "unsure"),
        Some(Err(AgentRefusal::ApplicationInactive))
    );

    // The owning group's only active member goes: so does the agent.
    patch(&dir, user_rt, &alice, set_active(false))
        .await
        .unwrap();
    assert_eq!(
        standing(&dir, "by-group"),
        Some(Err(AgentRefusal::NoActiveOwner))
    );
    patch(&dir, user_rt, &alice, set_active(true))
        .await
        .unwrap();
    assert_eq!(standing(&dir, "by-group"), Some(Ok(())));
    let remove_alice = patch_body(json!([
        {"op": "remove", "path": format!("members[value eq \"{alice}\"]")}
    ]));
    patch(&dir, group_rt, &eng, remove_alice).await.unwrap();
    assert_eq!(
        standing(&dir, "by-group"),
        Some(Err(AgentRefusal::NoActiveOwner))
    );
    // A nested group's active member stands for the owning group.
    let sre = create(
        &dir,
        ResourceType::Group,
        json!({"schemas": [GROUP], "displayName": "sre", "members": [{"value": alice}]}),
    )
    .await
    .unwrap()
    .id;
    let add_sre = patch_body(json!([{"op": "add", "path": "members", "value": [{"value": sre}]}]));
    patch(&dir, group_rt, &eng, add_sre).await.unwrap();
    assert_eq!(standing(&dir, "by-group"), Some(Ok(())));

    // The application goes inactive, then away.
    patch(&dir, app_rt, &app, set_active(false)).await.unwrap();
    assert_eq!(
        standing(&dir, "by-group"),
        Some(Err(AgentRefusal::ApplicationInactive))
    );
    patch(&dir, app_rt, &app, set_active(true)).await.unwrap();
    assert_eq!(standing(&dir, "by-group"), Some(Ok(())));
    dir.write(
        Command::Delete {
            rt: app_rt,
            id: app.clone(),
            if_match: None,
        },
        "test",
    )
    .await
    .unwrap();
    assert_eq!(
        standing(&dir, "by-group"),
        Some(Err(AgentRefusal::ApplicationInactive))
    );

    // The owning user is deleted.
    dir.write(
        Command::Delete {
            rt: user_rt,
            id: bob,
            if_match: None,
        },
        "test",
    )
    .await
    .unwrap();
    assert_eq!(
        standing(&dir, "by-bob"),
        Some(Err(AgentRefusal::NoActiveOwner))
    );
}

#[tokio::test]
async fn agents_are_unique_by_name_join_groups_and_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (agent_id, eng) = {
        let dir = open(tmp.path());
        let alice = create(&dir, ResourceType::User, user("alice"))
            .await
            .unwrap()
            .id;
        let id = create(
            &dir,
            ResourceType::Agent,
            agent("Helper", &[&alice], &[], None),
        )
        .await
        .unwrap()
        .id;
        let taken = create(
            &dir,
            ResourceType::Agent,
            agent("helper", &[&alice], &[], None),
        )
        .await
        .unwrap_err();
        assert_eq!(taken.status, 409);
        // Names are unique per type: a user may share an agent's name.
        create(&dir, ResourceType::User, user("Helper"))
            .await
            .unwrap();
        let app = create(
            &dir,
            ResourceType::AgenticApplication,
            json!({"schemas": [APPLICATION], "name": "Portal"}),
        )
        .await
        .unwrap()
        .id;
        let group =
            |members: Value| json!({"schemas": [GROUP], "displayName": "bots", "members": members});
        let refused = create(&dir, ResourceType::Group, group(json!([{"value": app}])))
            .await
            .unwrap_err();
        assert_eq!(refused.status, 400);
        let eng = create(
            &dir,
            ResourceType::Group,
            group(json!([{"value": id, "type": "Agent"}])),
        )
        .await
        .unwrap()
        .id;
        let found = |filter: &str| query(&dir, ResourceType::Agent, filter) == [id.as_str()];
        assert!(found("name eq \"HELPER\""));
        assert!(found("externalId eq \"client-Helper\""));
        (id, eng)
    };
    let dir = open(tmp.path());
    let members = dir.members(&eng);
    assert_eq!(members.len(), 1);
    assert_eq!(
        (members[0].id.as_str(), members[0].rt),
        (agent_id.as_str(), ResourceType::Agent)
    );
    assert_eq!(dir.groups_of(&agent_id)[0].display, "bots");
    assert_eq!(standing(&dir, "helper"), Some(Ok(())));

    dir.write(
        Command::Delete {
            rt: ResourceType::Agent,
            id: agent_id.clone(),
            if_match: None,
        },
        "test",
    )
    .await
    .unwrap();
    assert!(dir.members(&eng).is_empty());
    let deleted = |dir: &Directory| {
        dir.with_agent(AgentKey::ExternalId("client-Helper"), 0, |found| {
            matches!(found, AgentLookup::Deleted)
        })
    };
    assert!(deleted(&dir));
    drop(dir);
    assert!(deleted(&open(tmp.path())));
}

#[tokio::test]
async fn what_a_renamed_agent_was_found_by_stays_known_across_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let lookup = |dir: &Directory, key: AgentKey<'_>| {
        dir.with_agent(key, 0, |found| match found {
            AgentLookup::Found(view) => format!("found {}", view.agent.name),
            AgentLookup::Deleted => "deleted".to_owned(),
            AgentLookup::Unknown => "unknown".to_owned(),
            AgentLookup::Ambiguous(n) => format!("ambiguous {n}"),
        })
    };
    let former = [
        AgentKey::Name("Helper"),
        AgentKey::ExternalId("client-helper"),
    ];
    {
        let dir = open(tmp.path());
        let owner = created(&dir, ResourceType::User, user("own@x")).await;
        let helper = created(
            &dir,
            ResourceType::Agent,
            agent("helper", &[&owner], &[], None),
        )
        .await;
        let rename = patch_body(json!([{"op": "replace", "value": {
            "name": "helper-2", "externalId": "client-helper-2"}}]));
        patch(&dir, ResourceType::Agent, &helper, rename)
            .await
            .unwrap();
        for key in former {
            assert_eq!(lookup(&dir, key), "deleted", "{key:?}");
        }
        assert_eq!(lookup(&dir, AgentKey::Name("helper-2")), "found helper-2");
    }
    let dir = open(tmp.path());
    for key in former {
        assert_eq!(lookup(&dir, key), "deleted", "after a restart: {key:?}");
    }
}

/// One store two directories write to, as replicas share PostgreSQL: a commit must be built
/// on the latest batch, and the batches are read back through the feed. Nothing follows the
/// feed in the background, so a directory's index stays where its own writes left it.
#[derive(Default)]
struct SharedStore {
    inner: memory::MemoryStorage,
    log: std::sync::Mutex<Vec<Vec<u8>>>,
    /// What waiting for the other replicas finds: by default, that all have every commit.
    settles: Settles,
}

/// What [`Storage::settle`] of a [`SharedStore`] answers.
#[derive(Default, Clone, Copy)]
enum Settles {
    #[default]
    Everywhere,
    /// The replicas' progress cannot be read: no commit is known to be everywhere.
    Unconfirmed,
    /// Each commit is found lost (a failover).
    Lost,
    /// Neither the replicas' progress nor whether the store holds the commit can be read.
    Unknown,
}

impl Storage for SharedStore {
    fn load(&self, visit: &mut dyn FnMut(Loaded<'_>)) -> Result<(Seq, Row), StoreError> {
        self.inner.load(visit)
    }
    fn records(&self, rt: ResourceType, rows: &[Row]) -> Result<Vec<(Row, Record)>, StoreError> {
        self.inner.records(rt, rows)
    }
    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut log = self.log.lock().unwrap();
        let latest = log
            .last()
            .map_or(0, |b| serde_json::from_slice::<Batch>(b).unwrap().seq);
        if batch.base != latest {
            return Err(StoreError::Behind);
        }
        self.inner.commit(batch)?;
        log.push(serde_json::to_vec(batch).unwrap());
        Ok(())
    }
    fn changes(&self, after: Seq, limit: usize) -> Result<Vec<Change>, StoreError> {
        self.inner.changes(after, limit)
    }
    fn is_shared(&self) -> bool {
        true
    }
    fn feed(&self, after: Seq) -> Result<Feed, StoreError> {
        let log = self.log.lock().unwrap();
        let batches = log
            .iter()
            .map(|b| serde_json::from_slice::<Batch>(b).unwrap());
        Ok(Feed::Batches(batches.filter(|b| b.seq > after).collect()))
    }
    fn settle(&self, _seq: Seq, _committed: std::time::Instant) -> Result<(), StoreError> {
        match self.settles {
            Settles::Everywhere => Ok(()),
            Settles::Unconfirmed => Err(StoreError::Backend(
                "the replicas' progress cannot be read".to_owned(),
            )),
            Settles::Lost => Err(StoreError::Lost("a failover lost it".to_owned())),
            Settles::Unknown => Err(StoreError::Unsettled("nothing can be read".to_owned())),
        }
    }
}

/// A write committed but not known to be everywhere is answered 503, saying it is saved; a
/// write refused in the same moment is answered as refused (409 here), as it saved nothing.
#[tokio::test]
async fn a_refused_write_is_answered_as_refused_when_the_replicas_cannot_be_waited_for() {
    let settling = |settles| {
        let store = SharedStore {
            settles,
            ..SharedStore::default()
        };
        Directory::open(Arc::new(store), Box::new(time::OffsetDateTime::now_utc)).unwrap()
    };
    let dir = settling(Settles::Unconfirmed);
    let saved = create(&dir, ResourceType::User, user("ann@corp.example")).await;
    let saved = saved.expect_err("not confirmed everywhere");
    assert_eq!(saved.status, 503, "{saved:?}");
    assert!(saved.detail.contains("saved"), "{saved:?}");
    assert!(saved.saved(), "{saved:?}");
    assert!(dir.user_by_name("ann@corp.example").is_some());
    let again = create(&dir, ResourceType::User, user("ann@corp.example")).await;
    let again = again.expect_err("a name taken");
    assert_eq!(again.status, 409, "{again:?}");
    // Unless the commit was lost: the name was taken by a change that never was.
    let dir = settling(Settles::Lost);
    let lost = create(&dir, ResourceType::User, user("ann@corp.example")).await;
    let lost = lost.expect_err("lost");
    assert_eq!(lost.status, 503, "{lost:?}");
    assert!(!lost.saved(), "{lost:?}");
    let again = create(&dir, ResourceType::User, user("ann@corp.example")).await;
    let again = again.expect_err("judged against a lost change");
    assert_eq!(again.status, 503, "{again:?}");
    // Or where whether the store holds it cannot be read: it may not be saved.
    let dir = settling(Settles::Unknown);
    let unknown = create(&dir, ResourceType::User, user("ann@corp.example")).await;
    let unknown = unknown.expect_err("not known to be saved");
    assert_eq!(unknown.status, 503, "{unknown:?}");
    assert!(!unknown.saved(), "{unknown:?}");
    assert!(
        unknown.detail.contains("may not have been saved"),
        "{unknown:?}"
    );
    let again = create(&dir, ResourceType::User, user("ann@corp.example")).await;
    let again = again.expect_err("judged against a change that may not be");
    assert_eq!(again.status, 503, "{again:?}");
}

/// A shared store whose feed takes a while to read, counting the reads.
#[derive(Default)]
struct SlowFeed {
    inner: SharedStore,
    feeds: std::sync::atomic::AtomicUsize,
}

impl Storage for SlowFeed {
    fn load(&self, visit: &mut dyn FnMut(Loaded<'_>)) -> Result<(Seq, Row), StoreError> {
        self.inner.load(visit)
    }
    fn records(&self, rt: ResourceType, rows: &[Row]) -> Result<Vec<(Row, Record)>, StoreError> {
        self.inner.records(rt, rows)
    }
    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        self.inner.commit(batch)
    }
    fn changes(&self, after: Seq, limit: usize) -> Result<Vec<Change>, StoreError> {
        self.inner.changes(after, limit)
    }
    fn is_shared(&self) -> bool {
        true
    }
    fn feed(&self, after: Seq) -> Result<Feed, StoreError> {
        self.feeds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(300));
        self.inner.feed(after)
    }
}

/// Many asking to catch up at once (refused refreshes, the lease's renewal among them) are
/// answered by one reading of the store, not one each in turn.
#[test]
fn those_catching_up_at_once_share_one_reading_of_the_store() {
    let store = Arc::new(SlowFeed::default());
    let dir = Directory::open(store.clone(), Box::new(time::OffsetDateTime::now_utc)).unwrap();
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| dir.catch_up().unwrap());
        }
    });
    let feeds = store.feeds.load(std::sync::atomic::Ordering::SeqCst);
    assert!(feeds <= 3, "{feeds} readings of the feed for 8 at once");
}

#[tokio::test]
async fn a_write_that_changes_nothing_is_answered_once_this_replica_has_what_it_found() {
    let store = Arc::new(SharedStore::default());
    let replica = || Directory::open(store.clone(), Box::new(time::OffsetDateTime::now_utc));
    let (a, b) = (replica().unwrap(), replica().unwrap());
    let active = |dir: &Directory| {
        dir.with_subject(SubjectKey::UserName("dana@x"), |v| {
            v.found().map(|v| v.user.active)
        })
    };
    let dana = created(&a, ResourceType::User, user("dana@x")).await;
    let off = || patch_body(json!([{"op": "replace", "value": {"active": false}}]));
    // B deactivates her; A's index has not followed yet.
    b.catch_up().unwrap();
    patch(&b, ResourceType::User, &dana, off()).await.unwrap();
    assert_eq!(active(&a), Some(true));
    // The IdP repeats it on A, which finds her already inactive in the store: by the time A
    // answers, its own index refuses her too.
    patch(&a, ResourceType::User, &dana, off()).await.unwrap();
    assert_eq!(active(&a), Some(false));
    // A repeated delete's 404 likewise.
    let delete = || Command::Delete {
        rt: ResourceType::User,
        id: dana.clone(),
        if_match: None,
    };
    b.catch_up().unwrap();
    b.write(delete(), "test").await.unwrap();
    assert_eq!(active(&a), Some(false), "not followed yet");
    assert_eq!(a.write(delete(), "test").await.unwrap_err().status, 404);
    assert_eq!(active(&a), None);
}

/// A write that finds nothing to do on a replica whose index lags is built again once it has
/// caught up: a member another replica has just added, removed here by a request sent after
/// that addition was answered, is removed, not "not a member, nothing to remove".
#[tokio::test]
async fn a_write_that_finds_nothing_to_do_on_a_lagging_index_is_built_again() {
    let store = Arc::new(SharedStore::default());
    let replica = || Directory::open(store.clone(), Box::new(time::OffsetDateTime::now_utc));
    let (a, b) = (replica().unwrap(), replica().unwrap());
    let dana = created(&a, ResourceType::User, user("dana@x")).await;
    let eng = created(&a, ResourceType::Group, group("eng", &[])).await;
    b.catch_up().unwrap();
    // B adds her to eng; A's index has not followed yet.
    let add = patch_body(json!([{"op": "add", "path": "members", "value": [{"value": dana}]}]));
    patch(&b, ResourceType::Group, &eng, add).await.unwrap();
    assert!(a.groups_of(&dana).is_empty(), "A has not followed yet");
    // The IdP removes her through A.
    let remove = patch_body(json!([{
        "op": "remove",
        "path": format!("members[value eq \"{dana}\"]"),
    }]));
    patch(&a, ResourceType::Group, &eng, remove).await.unwrap();
    assert!(a.groups_of(&dana).is_empty(), "on A");
    b.catch_up().unwrap();
    assert!(b.groups_of(&dana).is_empty(), "on B: the removal was lost");
}

/// A group read on a replica whose index has not applied the stored record yet shows the
/// index's members: the answer claims no version, or a client holding the new ETag would be
/// told (304) its copy stands, and a client reading it would keep the old members under the
/// new version.
#[tokio::test]
async fn a_group_read_on_a_lagging_replica_claims_no_version() {
    use crate::service::{Limits, ScimRequest, ScimService};
    let store = Arc::new(SharedStore::default());
    let replica = || Directory::open(store.clone(), Box::new(time::OffsetDateTime::now_utc));
    let (a, b) = (replica().unwrap(), Arc::new(replica().unwrap()));
    let dana = created(&a, ResourceType::User, user("dana@x")).await;
    let eng = created(&a, ResourceType::Group, group("eng", &[])).await;
    b.catch_up().unwrap();
    let add = patch_body(json!([{"op": "add", "path": "members", "value": [{"value": dana}]}]));
    patch(&a, ResourceType::Group, &eng, add).await.unwrap();
    let stored = a.get(ResourceType::Group, &eng).unwrap().unwrap();
    let new = stored.resource["meta"]["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let limits = Limits {
        max_body_bytes: 1 << 20,
        max_bulk_operations: 10,
        max_results: 100,
    };
    let service = ScimService::new(b.clone(), limits);
    let path = format!("/Groups/{eng}");
    let read = || {
        service.handle(ScimRequest {
            method: &http::Method::GET,
            path: &path,
            query: None,
            if_match: None,
            if_none_match: Some(&new),
            body: b"",
            base_url: "http://auth.test/scim/v2",
            actor: "test",
            client: None,
            stands: &|| true,
        })
    };
    let lagging = read().await;
    assert_eq!((lagging.status, lagging.etag.as_deref()), (200, None));
    let body = lagging.body.unwrap();
    assert_eq!(body["members"], json!([]), "B has not applied it");
    assert_eq!(body["meta"].get("version"), None, "{body}");
    // Nor where it is listed: by a filter, and in a search of every type.
    for (method, path, query, search) in [
        (http::Method::GET, "/Groups", Some("filter=displayName%20eq%20%22eng%22"), &b""[..]),
        (http::Method::POST, "/.search", None, &br#"{"schemas":["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],"filter":"displayName eq \"eng\""}"#[..]),
    ] {
        let listed = service
            .handle(ScimRequest {
                method: &method,
                path,
                query,
                if_match: None,
                if_none_match: None,
                body: search,
                base_url: "http://auth.test/scim/v2",
                actor: "test",
                client: None,
                stands: &|| true,
            })
            .await;
        let body = listed.body.unwrap();
        let found = &body["Resources"][0];
        assert_eq!(found["id"], json!(eng), "{path}: {body}");
        assert_eq!(found["meta"].get("version"), None, "{path}: {body}");
    }
    b.catch_up().unwrap();
    let caught_up = read().await;
    assert_eq!((caught_up.status, caught_up.etag), (304, Some(new)));
}

#[test]
fn a_failing_store_tells_the_idp_to_try_again_and_nothing_of_what_failed() {
    let failed = StoreError::Backend("connection to db.internal:5432 refused".to_owned());
    let answer = crate::error::ScimError::from(failed);
    assert_eq!(answer.status, 503);
    assert!(!answer.detail.contains("db.internal"), "{}", answer.detail);
}

/// `sortBy` sorts by what a client names: a core attribute however written, an extension's
/// attribute, and a multi-valued one by its primary value (RFC 7644 §3.4.2.3); users without
/// the value come last.
#[tokio::test]
async fn sort_by_an_extension_or_a_multi_valued_attribute_sorts_by_its_value() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = open(tmp.path());
    let enterprise = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
    for (name, department, emails) in [
        (
            "b@x",
            "Sales",
            json!([{"value": "z@x"}, {"value": "a@x", "primary": true}]),
        ),
        ("c@x", "Eng", json!([{"value": "m@x"}])),
        (
            "a@x",
            "Ops",
            json!([{"value": "b@x", "primary": false}, {"value": "y@x"}]),
        ),
    ] {
        let mut body = user(name);
        body["schemas"] = json!([USER, enterprise]);
        body[enterprise] = json!({"department": department});
        body["emails"] = emails;
        create(&dir, ResourceType::User, body).await.unwrap();
    }
    // No extension and no emails, and a core `title`: not the extension's (below).
    let mut bare = user("d@x");
    bare.as_object_mut().unwrap().remove("emails");
    bare["title"] = json!("Aaa");
    create(&dir, ResourceType::User, bare).await.unwrap();
    let sorted = |by: &str| -> Vec<String> {
        let sort_by = crate::path::PatchPath::parse(by).unwrap().attr;
        let query = Query {
            sort_by: Some(sort_by),
            ..Query::default()
        };
        let page = dir.query(ResourceType::User, &query).unwrap();
        page.records
            .iter()
            .map(|r| r.resource["userName"].as_str().unwrap().to_owned())
            .collect()
    };
    for (by, want) in [
        ("userName", ["a@x", "b@x", "c@x", "d@x"]),
        (&format!("{USER}:userName"), ["a@x", "b@x", "c@x", "d@x"]),
        (
            &format!("{enterprise}:department"),
            ["c@x", "a@x", "b@x", "d@x"],
        ),
        ("emails", ["b@x", "a@x", "c@x", "d@x"]),
        ("emails.value", ["b@x", "a@x", "c@x", "d@x"]),
        // No one has a `title` in the extension: in creation order.
        (&format!("{enterprise}:title"), ["b@x", "c@x", "a@x", "d@x"]),
    ] {
        assert_eq!(sorted(by), want, "sortBy={by}");
    }
    // A page of the sorted matches, either way (those without the value last ascending and
    // first descending: RFC 7644 §3.4.2.3).
    let page = |order: SortOrder| -> Vec<String> {
        let query = Query {
            sort_by: Some(crate::path::PatchPath::parse("emails").unwrap().attr),
            sort_order: order,
            start_index: 2,
            count: Some(2),
            ..Query::default()
        };
        let page = dir.query(ResourceType::User, &query).unwrap();
        assert_eq!(page.total, 4);
        page.records
            .iter()
            .map(|r| r.resource["userName"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(page(SortOrder::Ascending), ["a@x", "c@x"]);
    assert_eq!(page(SortOrder::Descending), ["c@x", "a@x"]);
}

/// What a later build keeps in a record and this one does not know is carried through this
/// one's rewrites of it (a rolling upgrade: an older replica answering a PATCH must not erase
/// what the newer ones rely on, such as when a service account was re-activated).
#[tokio::test]
async fn a_rewrite_keeps_what_a_later_build_stored_in_the_record() {
    let storage = Arc::new(memory::MemoryStorage::default());
    let dir = Directory::open(storage.clone(), Box::new(time::OffsetDateTime::now_utc)).unwrap();
    let id = created(&dir, ResourceType::User, user("ann@x")).await;
    let (_, row) = dir.read(|index| index.row_of(&id)).unwrap();
    storage.edit_stored(ResourceType::User, row, |record| {
        record["guard_from_later"] = json!({"since": 1_234});
    });
    let body = patch_body(json!([{"op": "replace", "path": "displayName", "value": "Ann"}]));
    patch(&dir, ResourceType::User, &id, body).await.unwrap();
    let stored = storage.stored(ResourceType::User, row).unwrap();
    assert_eq!(stored["resource"]["displayName"], "Ann", "{stored}");
    assert_eq!(
        stored["guard_from_later"],
        json!({"since": 1_234}),
        "{stored}"
    );
}

/// A group created, replaced or deleted names in its change the members it gave what the
/// group grants, or took it from (a console's user page finds them by id), and a change says
/// what address its request came from.
#[tokio::test]
async fn a_group_s_change_names_the_members_it_adds_and_says_where_it_came_from() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = open(tmp.path());
    let ann = created(&dir, ResourceType::User, user("ann@x")).await;
    let bob = created(&dir, ResourceType::User, user("bob@x")).await;
    let last_change = |seq: Seq| dir.changes(seq - 1, 10).unwrap().pop().unwrap();

    let resource = validate_resource(ResourceType::Group, &group("admins", &[&ann]), Mode::Create);
    let command = Command::Create {
        rt: ResourceType::Group,
        resource: resource.unwrap(),
        password_hash: None,
    };
    let written = dir.write_from(command, "okta", Some("203.0.113.9")).await;
    let admins = written.unwrap();
    let change = last_change(admins.seq);
    assert_eq!(change.client.as_deref(), Some("203.0.113.9"));
    assert!(
        change.summary.ends_with(&format!("members +[{ann}]")),
        "{change:?}"
    );

    let resource = validate_resource(
        ResourceType::Group,
        &group("admins", &[&bob]),
        Mode::Replace,
    );
    let command = Command::Replace {
        rt: ResourceType::Group,
        id: admins.id.clone(),
        resource: resource.unwrap(),
        password_hash: None,
        if_match: None,
    };
    let replaced = dir.write(command, "okta").await.unwrap();
    let change = last_change(replaced.seq);
    assert_eq!(change.client, None, "no address given");
    assert!(
        change.summary.ends_with(&format!("+[{bob}] -[{ann}]")),
        "{change:?}"
    );

    // Deleted, the group names the members it took its grant from.
    let deleted = dir
        .write(
            Command::Delete {
                rt: ResourceType::Group,
                id: admins.id.clone(),
                if_match: None,
            },
            "okta",
        )
        .await
        .unwrap();
    let change = last_change(deleted.seq);
    assert!(
        change.summary.ends_with(&format!("members -[{bob}]")),
        "{change:?}"
    );
}

/// A change says what access turns on: a renamed group (rules name groups by `displayName`)
/// with its old and new names, before the members it adds (read as ids, outside quotes); a
/// deactivated or re-activated agent or application, as a user's, in so many words.
#[tokio::test]
async fn a_change_names_a_rename_and_a_deactivation_of_any_kind() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = open(tmp.path());
    let last = |seq: Seq| dir.changes(seq - 1, 10).unwrap().pop().unwrap().summary;
    let ann = created(&dir, ResourceType::User, user("ann@x")).await;
    let group = created(&dir, ResourceType::Group, group("interns", &[])).await;
    // As Okta renames a group, with a member added in the same request.
    let rename = patch_body(json!([
        {"op": "replace", "value": {"id": group, "displayName": "sre"}},
        {"op": "add", "path": "members", "value": [{"value": ann}]},
    ]));
    let written = patch(&dir, ResourceType::Group, &group, rename)
        .await
        .unwrap();
    let summary = last(written.seq);
    assert!(
        summary.starts_with("displayName \"interns\" → \"sre\", "),
        "{summary}"
    );
    assert!(
        summary.rsplit('"').next().unwrap().contains(&ann),
        "{summary}"
    );

    let app = json!({"schemas": [APPLICATION], "name": "helpdesk"});
    let app = created(&dir, ResourceType::AgenticApplication, app).await;
    let bot = agent("bot", &[&ann], &[&app], None);
    let bot = created(&dir, ResourceType::Agent, bot).await;
    for (rt, id) in [
        (ResourceType::Agent, &bot),
        (ResourceType::AgenticApplication, &app),
    ] {
        // As Entra writes it.
        let off = patch_body(json!([{"op": "Replace", "path": "active", "value": "False"}]));
        let written = patch(&dir, rt, id, off).await.unwrap();
        assert!(last(written.seq).ends_with(", deactivated"), "{rt:?}");
        let written = patch(&dir, rt, id, set_active(true)).await.unwrap();
        assert!(last(written.seq).ends_with(", re-activated"), "{rt:?}");
    }
}

/// A shared store that fails over: to another store holding the same history up to a point
/// and another batch after it, its feed saying so once (as PostgreSQL's does, from the commit
/// times).
struct Failover {
    current: std::sync::Mutex<Arc<SharedStore>>,
    gap: std::sync::atomic::AtomicBool,
}

impl Failover {
    fn store(&self) -> Arc<SharedStore> {
        self.current.lock().unwrap().clone()
    }

    fn to(&self, other: Arc<SharedStore>) {
        *self.current.lock().unwrap() = other;
        self.gap.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Storage for Failover {
    fn load(&self, visit: &mut dyn FnMut(Loaded<'_>)) -> Result<(Seq, Row), StoreError> {
        self.store().load(visit)
    }
    fn records(&self, rt: ResourceType, rows: &[Row]) -> Result<Vec<(Row, Record)>, StoreError> {
        self.store().records(rt, rows)
    }
    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        self.store().commit(batch)
    }
    fn changes(&self, after: Seq, limit: usize) -> Result<Vec<Change>, StoreError> {
        self.store().changes(after, limit)
    }
    fn is_shared(&self) -> bool {
        true
    }
    fn feed(&self, after: Seq) -> Result<Feed, StoreError> {
        if self.gap.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Ok(Feed::Gap);
        }
        self.store().feed(after)
    }
}

/// A removal from a group the database lost in a failover, sent again to a replica whose index
/// still has it (membership is judged on the index), is made again: read anew, the directory
/// has the member in the group, at the same sequence number (another batch took it), and the
/// repeat is not answered from the old index as nothing to do.
#[tokio::test]
async fn a_write_repeated_after_the_database_lost_it_is_made_again() {
    let first = Arc::new(SharedStore::default());
    let store = Arc::new(Failover {
        current: std::sync::Mutex::new(first.clone()),
        gap: std::sync::atomic::AtomicBool::new(false),
    });
    let now = || Box::new(time::OffsetDateTime::now_utc);
    let a = Directory::open(store.clone(), now()).unwrap();
    let dana = created(&a, ResourceType::User, user("dana@x")).await;
    let eng = created(&a, ResourceType::Group, group("eng", &[&dana])).await;
    // The standby has the history up to here; another replica then writes there.
    let standby = Arc::new(SharedStore::default());
    for batch in first.log.lock().unwrap().iter() {
        standby
            .commit(&serde_json::from_slice::<Batch>(batch).unwrap())
            .unwrap();
    }
    let remove = || {
        let path = format!("members[value eq \"{dana}\"]");
        patch_body(json!([{"op": "remove", "path": path}]))
    };
    patch(&a, ResourceType::Group, &eng, remove())
        .await
        .unwrap();
    let b = Directory::open(standby.clone(), now()).unwrap();
    created(&b, ResourceType::User, user("eve@x")).await;
    assert_eq!(a.seq(), b.seq(), "the same number, another history");

    store.to(standby.clone());
    // The IdP sends it again (its answer was a 503): made, not found done.
    patch(&a, ResourceType::Group, &eng, remove())
        .await
        .unwrap();
    let in_eng = |dir: &Directory| {
        dir.with_subject(SubjectKey::UserName("dana@x"), |v| {
            v.found()
                .map(|v| v.groups.iter().any(|g| &*g.display_name == "eng"))
        })
    };
    assert_eq!(in_eng(&a), Some(false));
    let c = Directory::open(standby, now()).unwrap();
    assert_eq!(in_eng(&c), Some(false), "the database has it");
}

/// An agent's change names by id the owners and applications it gains or loses, as a group's
/// names its members: an owner added lets the agent in with the tokens it holds, and a
/// console's page for that owner finds the change.
#[tokio::test]
async fn an_agent_s_change_names_the_owners_and_applications_it_gains_or_loses() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = open(tmp.path());
    let alice = created(&dir, ResourceType::User, user("alice")).await;
    let bob = created(&dir, ResourceType::User, user("bob")).await;
    let app = created(
        &dir,
        ResourceType::AgenticApplication,
        json!({"schemas": [crate::schema::AGENTIC_APPLICATION_SCHEMA], "name": "Helpdesk"}),
    )
    .await;
    let last_change = |seq: Seq| dir.changes(seq - 1, 10).unwrap().pop().unwrap();
    let body = agent("helper", &[&alice], &[&app], None);
    let written = create(&dir, ResourceType::Agent, body).await.unwrap();
    let summary = last_change(written.seq).summary;
    assert!(
        summary.contains(&format!("owners +[{alice}] -[]")),
        "{summary}"
    );
    assert!(
        summary.contains(&format!("applications +[{app}] -[]")),
        "{summary}"
    );

    let path = format!("{AGENT_EXT}:owners");
    let ops = json!([
        {"op": "add", "path": path, "value": [{"value": bob}]},
        {"op": "remove", "path": format!("{path}[value eq \"{alice}\"]")},
    ]);
    let written = patch(&dir, ResourceType::Agent, &written.id, patch_body(ops))
        .await
        .unwrap();
    let summary = last_change(written.seq).summary;
    assert!(
        summary.contains(&format!("owners +[{bob}] -[{alice}]")),
        "{summary}"
    );
    assert!(!summary.contains("applications"), "{summary}");

    // Deleted: it loses them all.
    let command = Command::Delete {
        rt: ResourceType::Agent,
        id: written.id.clone(),
        if_match: None,
    };
    let deleted = dir.write(command, "test").await.unwrap();
    let summary = last_change(deleted.seq).summary;
    assert!(
        summary.contains(&format!("owners +[] -[{bob}]")),
        "{summary}"
    );
    assert!(
        summary.contains(&format!("applications +[] -[{app}]")),
        "{summary}"
    );
}

/// A store that counts the writer's reads.
#[derive(Default)]
struct CountedReads {
    inner: memory::MemoryStorage,
    reads: std::sync::atomic::AtomicUsize,
}

impl Storage for CountedReads {
    fn load(&self, visit: &mut dyn FnMut(Loaded<'_>)) -> Result<(Seq, Row), StoreError> {
        self.inner.load(visit)
    }
    fn records(&self, rt: ResourceType, rows: &[Row]) -> Result<Vec<(Row, Record)>, StoreError> {
        self.inner.records(rt, rows)
    }
    fn records_for_writer(
        &self,
        rt: ResourceType,
        rows: &[Row],
    ) -> Result<Vec<(Row, Record)>, StoreError> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.records(rt, rows)
    }
    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        self.inner.commit(batch)
    }
    fn changes(&self, after: Seq, limit: usize) -> Result<Vec<Change>, StoreError> {
        self.inner.changes(after, limit)
    }
}

/// Deleting a user in many groups reads those groups (to give each a new version) in one
/// request, however many: over PostgreSQL each read is a round trip, on the thread that
/// renews the replica's lease.
#[tokio::test]
async fn a_user_leaving_many_groups_costs_one_read_of_them() {
    let store = Arc::new(CountedReads::default());
    let dir = Directory::open(store.clone(), Box::new(time::OffsetDateTime::now_utc)).unwrap();
    let gus = created(&dir, ResourceType::User, user("gus@x")).await;
    let mut groups = Vec::new();
    for i in 0..300 {
        groups.push(created(&dir, ResourceType::Group, group(&format!("g{i}"), &[&gus])).await);
    }
    let version = |id: &str| {
        let group = dir.get(ResourceType::Group, id).unwrap().unwrap();
        group.resource["meta"]["version"].clone()
    };
    let before: Vec<Value> = groups.iter().map(|id| version(id)).collect();
    let reads = || store.reads.load(std::sync::atomic::Ordering::SeqCst);
    let start = reads();
    let gone = Command::Delete {
        rt: ResourceType::User,
        id: gus,
        if_match: None,
    };
    dir.write(gone, "test").await.unwrap();
    assert!(reads() - start <= 2, "{} reads", reads() - start);
    for (id, before) in groups.iter().zip(before) {
        assert_ne!(version(id), before, "{id}: a new version");
        assert!(dir.members(id).is_empty());
    }
}

/// A directory closed at shutdown leaves its file closed cleanly: the next start opens it
/// without redb's repair, which walks the whole file (a process exits without dropping
/// anything, so without the close every start after a write repaired it).
#[tokio::test]
async fn a_closed_directory_opens_again_without_a_repair() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = open(tmp.path());
    created(&dir, ResourceType::User, user("ann@x")).await;
    dir.close();
    // A write after it (a request past the drain's wait) is refused, not written by opening
    // the file again.
    let late = create(&dir, ResourceType::User, user("bob@x")).await;
    assert_eq!(late.err().map(|e| e.status), Some(503));
    // As `process::exit` leaves it: nothing dropped.
    std::mem::forget(dir);
    let repaired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = repaired.clone();
    let reopened = ::redb::Builder::new()
        .set_repair_callback(move |_| seen.store(true, std::sync::atomic::Ordering::SeqCst))
        .open(tmp.path().join("directory.redb"));
    assert!(reopened.is_ok(), "{:?}", reopened.err());
    assert!(
        !repaired.load(std::sync::atomic::Ordering::SeqCst),
        "repaired"
    );
}

/// A user in many groups whose record is replaced (a profile change, a deactivation) keeps
/// them all, and the index takes the change at once: every request waits while it does. And a
/// directory holding them loads as soon. Each is timed against the same with a tenth of the
/// groups (the least of three tries, so that a loaded machine slows both alike): some ten times
/// as long where the work grows with the groups, a hundred where it grows with their square.
/// (The index added them back one at a time, each after a look through those added so far: a
/// second for a user in 50,000 groups.)
#[tokio::test(flavor = "multi_thread")]
async fn a_user_in_many_groups_is_changed_and_loaded_at_once() {
    let (few, many) = (InGroups::make(5_000).await, InGroups::make(50_000).await);
    // Taken in turn, so that a machine loaded for a while slows both alike.
    let least = std::time::Duration::MAX;
    let (mut few_change, mut many_change, mut few_load, mut many_load) =
        (least, least, least, least);
    for active in [false, true, false] {
        few_change = few_change.min(few.change(active).await);
        many_change = many_change.min(many.change(active).await);
        few_load = few_load.min(few.load());
        many_load = many_load.min(many.load());
    }
    // Against a millisecond at least: a change of either takes a fraction of one, which a
    // loaded machine's scheduling may make many times longer on one side only.
    let times = |many: std::time::Duration, few: std::time::Duration| {
        many.as_secs_f64() / few.as_secs_f64().max(1e-3)
    };
    let (change, load) = (times(many_change, few_change), times(many_load, few_load));
    eprintln!("ten times the groups: changed in {change:.1} times as long, loaded in {load:.1}");
    assert!(change < 30.0, "{many_change:?} against {few_change:?}");
    assert!(load < 30.0, "{many_load:?} against {few_load:?}");
}

/// A directory holding a user in `n` groups.
struct InGroups {
    storage: Arc<crate::store::memory::MemoryStorage>,
    dir: Arc<Directory>,
    auditor: String,
    n: usize,
}

impl InGroups {
    async fn make(n: usize) -> InGroups {
        let storage = Arc::new(crate::store::memory::MemoryStorage::default());
        let dir = InGroups::open(&storage);
        let auditor = created(&dir, ResourceType::User, user("auditor@x")).await;
        for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
            let writes: Vec<_> = chunk
                .iter()
                .map(|&i| {
                    let (dir, auditor) = (dir.clone(), auditor.clone());
                    tokio::spawn(async move {
                        created(
                            &dir,
                            ResourceType::Group,
                            group(&format!("g{i}"), &[&auditor]),
                        )
                        .await
                    })
                })
                .collect();
            for write in writes {
                write.await.unwrap();
            }
        }
        let made = InGroups {
            storage,
            dir,
            auditor,
            n,
        };
        assert_eq!(made.groups(&made.dir), n);
        made
    }

    fn open(storage: &Arc<crate::store::memory::MemoryStorage>) -> Arc<Directory> {
        let storage = storage.clone();
        Arc::new(Directory::open(storage, Box::new(time::OffsetDateTime::now_utc)).unwrap())
    }

    fn groups(&self, dir: &Directory) -> usize {
        dir.read(|index| {
            let (_, row) = index.row_of(&self.auditor).unwrap();
            index.parents_of(row).count()
        })
    }

    /// How long a change of the user takes (to `active`).
    async fn change(&self, active: bool) -> std::time::Duration {
        let started = std::time::Instant::now();
        let ops = json!([{"op": "replace", "path": "active", "value": active}]);
        patch(
            &self.dir,
            ResourceType::User,
            &self.auditor,
            patch_body(ops),
        )
        .await
        .unwrap();
        let took = started.elapsed();
        assert_eq!(self.groups(&self.dir), self.n, "its groups kept");
        took
    }

    /// How long a load of the directory takes.
    fn load(&self) -> std::time::Duration {
        let started = std::time::Instant::now();
        let loaded = InGroups::open(&self.storage);
        let took = started.elapsed();
        assert_eq!(self.groups(&loaded), self.n, "its groups loaded");
        took
    }
}
