//! Ownership shifting for container runtimes: `uidmapping=`, `gidmapping=`
//! and the `squash_to_*` options, with fuse-overlayfs's meaning.
//!
//! A mapping `A:B:LEN` says: ids stored in the layers from A to A+LEN-1 are
//! shown through the mount as B to B+LEN-1. Image layers keep the ids of
//! the image (0 for root), while a container running in a user namespace
//! sees its files owned by its host ids. New files and chown go the other
//! way: the caller's id B+n is stored as A+n. An id outside every mapping is
//! shown as the overflow id 65534, as the kernel shows unmapped ids.

use std::fmt;

/// The id shown for a stored id that no mapping covers.
pub const OVERFLOW_ID: u32 = 65534;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdRange {
    pub stored: u32,
    pub shown: u32,
    pub len: u32,
}

/// How one kind of id (user or group) is shifted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdMap {
    pub ranges: Vec<IdRange>,
    /// Every id is shown as this one (`squash_to_uid`, `squash_to_root`).
    pub squash: Option<u32>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct BadMapping(pub String);

impl fmt::Display for BadMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl IdMap {
    /// Parse `A:B:LEN[:A:B:LEN...]`; containers-storage may add a leading
    /// colon.
    pub fn parse(text: &str) -> Result<Vec<IdRange>, BadMapping> {
        let numbers: Vec<&str> = text.trim_start_matches(':').split(':').collect();
        if numbers.is_empty() || !numbers.len().is_multiple_of(3) {
            return Err(BadMapping(format!("{text:?} is not a list of STORED:SHOWN:LENGTH triples")));
        }
        let parse = |n: &str| n.parse::<u32>().map_err(|_| BadMapping(format!("{n:?} in {text:?} is not an id")));
        let mut ranges = Vec::new();
        for triple in numbers.chunks(3) {
            let range = IdRange { stored: parse(triple[0])?, shown: parse(triple[1])?, len: parse(triple[2])? };
            if range.len == 0
                || range.stored.checked_add(range.len - 1).is_none()
                || range.shown.checked_add(range.len - 1).is_none()
            {
                return Err(BadMapping(format!(
                    "range {}:{}:{} is empty or overflows",
                    triple[0], triple[1], triple[2]
                )));
            }
            ranges.push(range);
        }
        Ok(ranges)
    }

    /// The id the mount shows for an id stored in a layer.
    pub fn shown(&self, stored: u32) -> u32 {
        if let Some(id) = self.squash {
            return id;
        }
        if self.ranges.is_empty() {
            return stored;
        }
        self.ranges
            .iter()
            .find(|r| stored >= r.stored && stored - r.stored < r.len)
            .map(|r| r.shown + (stored - r.stored))
            .unwrap_or(OVERFLOW_ID)
    }

    /// The id to store for an id a caller gave (its own, or chown's).
    pub fn stored(&self, shown: u32) -> u32 {
        if self.ranges.is_empty() {
            return shown;
        }
        self.ranges
            .iter()
            .find(|r| shown >= r.shown && shown - r.shown < r.len)
            .map(|r| r.stored + (shown - r.shown))
            .unwrap_or(OVERFLOW_ID)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_shifts_both_ways_and_unmapped_ids_overflow() {
        let map = IdMap { ranges: IdMap::parse(":0:100000:65536").unwrap(), squash: None };
        assert_eq!(map.shown(0), 100000);
        assert_eq!(map.shown(1000), 101000);
        assert_eq!(map.shown(70000), OVERFLOW_ID);
        assert_eq!(map.stored(100000), 0);
        assert_eq!(map.stored(5), OVERFLOW_ID);
    }

    #[test]
    fn several_ranges_and_squash() {
        let ranges = IdMap::parse("0:1000:1:1:100000:65536").unwrap();
        assert_eq!(ranges.len(), 2);
        let map = IdMap { ranges, squash: None };
        assert_eq!(map.shown(0), 1000);
        assert_eq!(map.shown(1), 100000);
        assert_eq!(map.stored(100001), 2);
        let squashed = IdMap { ranges: Vec::new(), squash: Some(0) };
        assert_eq!(squashed.shown(1234), 0);
        assert_eq!(squashed.stored(1234), 1234);
    }

    #[test]
    fn malformed_mappings_are_refused() {
        assert!(IdMap::parse("0:1").is_err());
        assert!(IdMap::parse("0:x:5").is_err());
        assert!(IdMap::parse("0:0:0").is_err());
        assert!(IdMap::parse("4294967295:0:2").is_err());
    }
}
