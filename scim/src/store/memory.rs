//! A [`Storage`] that keeps everything in memory: nothing survives the process. For tests of
//! code that needs a real [`Directory`](super::Directory) (the proxy's gate, say) without a
//! disk; never for serving.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError};

use super::{Batch, Change, Entry, Loaded, Record, Row, Seq, Storage, StoreError};
use crate::schema::ResourceType;

#[derive(Default)]
pub struct MemoryStorage {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    seq: Seq,
    next_row: Row,
    /// Records as their JSON, as a durable backend stores them.
    resources: HashMap<(ResourceType, Row), Vec<u8>>,
    members: BTreeSet<(Row, Row)>,
    changes: BTreeMap<Seq, Change>,
    entries: BTreeMap<(String, String), String>,
}

impl MemoryStorage {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the record at `row` as stored (as another build would have written it).
    #[cfg(test)]
    pub fn edit_stored(
        &self,
        rt: ResourceType,
        row: Row,
        edit: impl FnOnce(&mut serde_json::Value),
    ) {
        let mut state = self.state();
        let bytes = state
            .resources
            .get_mut(&(rt, row))
            .expect("a stored record");
        let mut record: serde_json::Value = serde_json::from_slice(bytes).expect("JSON");
        edit(&mut record);
        *bytes = serde_json::to_vec(&record).expect("JSON");
    }

    /// The record at `row` as stored.
    #[cfg(test)]
    pub fn stored(&self, rt: ResourceType, row: Row) -> Option<serde_json::Value> {
        let state = self.state();
        let bytes = state.resources.get(&(rt, row))?;
        serde_json::from_slice(bytes).ok()
    }
}

impl Storage for MemoryStorage {
    fn load(&self, visit: &mut dyn FnMut(Loaded<'_>)) -> Result<(Seq, Row), StoreError> {
        let state = self.state();
        for (&(rt, row), bytes) in &state.resources {
            visit(Loaded::Resource(rt, row, bytes));
        }
        for &(group, member) in &state.members {
            visit(Loaded::Member { group, member });
        }
        for ((kind, key), value) in &state.entries {
            visit(Loaded::Entry(Entry {
                kind: kind.clone(),
                key: key.clone(),
                value: Some(value.clone()),
            }));
        }
        Ok((state.seq, state.next_row.max(1)))
    }

    fn records(&self, rt: ResourceType, rows: &[Row]) -> Result<Vec<(Row, Record)>, StoreError> {
        let state = self.state();
        rows.iter()
            .filter_map(|&row| state.resources.get(&(rt, row)).map(|b| (row, b)))
            .map(|(row, bytes)| {
                serde_json::from_slice(bytes)
                    .map(|record| (row, record))
                    .map_err(|e| StoreError::Corrupt(format!("row {row}: {e}")))
            })
            .collect()
    }

    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut state = self.state();
        for (rt, row, record) in &batch.records {
            let key = (*rt, *row);
            match record {
                Some(record) => {
                    let bytes = serde_json::to_vec(record)
                        .map_err(|e| StoreError::Backend(e.to_string()))?;
                    state.resources.insert(key, bytes);
                }
                None => {
                    state.resources.remove(&key);
                }
            }
        }
        for &(group, member, present) in &batch.members {
            if present {
                state.members.insert((group, member));
            } else {
                state.members.remove(&(group, member));
            }
        }
        for change in &batch.changes {
            state.changes.insert(change.seq, change.clone());
        }
        for entry in &batch.entries {
            let key = (entry.kind.clone(), entry.key.clone());
            match &entry.value {
                Some(value) => state.entries.insert(key, value.clone()),
                None => state.entries.remove(&key),
            };
        }
        state.seq = batch.seq;
        state.next_row = batch.next_row;
        Ok(())
    }

    fn changes(&self, after: Seq, limit: usize) -> Result<Vec<Change>, StoreError> {
        let state = self.state();
        Ok(state
            .changes
            .range(after.saturating_add(1)..)
            .take(limit)
            .map(|(_, change)| change.clone())
            .collect())
    }
}
