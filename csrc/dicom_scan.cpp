// Structure scanner behind medge.dicom's fast reader (see medge/dicom_scan.h).
// It walks element headers of a native little-endian Part 10 file, skipping values,
// and records where the wanted top-level elements lie. Every read goes through
// Cursor, which checks the bounds first; the grammar accepted is a strict subset of
// what pydicom 3 parses the same way (anything else: a fallback status, never a crash).
#include "medge/dicom_scan.h"

#include <cstring>

namespace medge {
namespace {

constexpr uint32_t kUndefinedLength = 0xFFFFFFFFu;
constexpr uint32_t kItem = 0xFFFEE000u;
constexpr uint32_t kItemDelimiter = 0xFFFEE00Du;
constexpr uint32_t kSequenceDelimiter = 0xFFFEE0DDu;
constexpr uint32_t kSpecificCharacterSet = 0x00080005u;

constexpr char kImplicitVRLittleEndian[] = "1.2.840.10008.1.2";
constexpr char kExplicitVRLittleEndian[] = "1.2.840.10008.1.2.1";

uint16_t le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t le32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16) |
         (static_cast<uint32_t>(p[3]) << 24);
}

// The two-letter VRs of PS3.5 (pydicom 3's set), and those with a 32-bit length field,
// as bits of a 26 x 26 table indexed by the two letters.
struct VRTable {
  bool known[26 * 26] = {};
  bool long_length[26 * 26] = {};
  VRTable() {
    static const char* const kVRs[] = {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO",
                                       "LT", "OB", "OD", "OF", "OL", "OV", "OW", "PN", "SH", "SL", "SQ",
                                       "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV"};
    static const char* const kLong[] = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"};
    for (const char* vr : kVRs) known[(vr[0] - 'A') * 26 + (vr[1] - 'A')] = true;
    for (const char* vr : kLong) long_length[(vr[0] - 'A') * 26 + (vr[1] - 'A')] = true;
  }
};
const VRTable kVRTable;

int vr_index(uint8_t a, uint8_t b) {
  if (a < 'A' || a > 'Z' || b < 'A' || b > 'Z') return -1;
  return (a - 'A') * 26 + (b - 'A');
}
bool known_vr(uint8_t a, uint8_t b) {
  const int i = vr_index(a, b);
  return i >= 0 && kVRTable.known[i];
}
bool long_length_vr(uint8_t a, uint8_t b) {
  const int i = vr_index(a, b);
  return i >= 0 && kVRTable.long_length[i];
}
bool is_sq(const uint8_t* vr) { return vr[0] == 'S' && vr[1] == 'Q'; }

// One element header as read from the buffer.
struct Header {
  uint32_t tag = 0;
  uint8_t vr[2] = {0, 0};  // {0, 0} in implicit VR
  uint32_t length = 0;
  std::size_t value = 0;  // offset of the value (just after the header)
};

class Scanner {
 public:
  Scanner(const uint8_t* data, std::size_t size, ScanResult& result) : data_(data), size_(size), result_(result) {}

  // Returns false (with result_.status set) to hand the file back.
  bool run(const WantedElement* wanted, std::size_t wanted_count) {
    wanted_ = wanted;
    wanted_count_ = wanted_count;
    return scan();
  }

 private:
  const uint8_t* data_;
  std::size_t size_;
  ScanResult& result_;
  const WantedElement* wanted_ = nullptr;
  std::size_t wanted_count_ = 0;
  std::size_t next_wanted_ = 0;
  bool implicit_ = false;

  bool fail(ScanStatus status, const char* reason, std::size_t at) {
    result_.status = status;
    result_.reason = reason;
    result_.at = at;
    return false;
  }

  std::size_t remaining(std::size_t pos) const { return pos <= size_ ? size_ - pos : 0; }

  // Records `h` when it is the next wanted tag (tags arrive in increasing order, so one
  // pointer walks the sorted wanted list). Checks its kind, VR and length.
  bool offer(const Header& h, std::size_t pos) {
    while (next_wanted_ < wanted_count_ && wanted_[next_wanted_].tag < h.tag) ++next_wanted_;
    if (next_wanted_ >= wanted_count_ || wanted_[next_wanted_].tag != h.tag) return true;
    const WantedElement& w = wanted_[next_wanted_];
    if (w.kind == WantedKind::kRefused) return fail(ScanStatus::kRefused, "an element the fast reader leaves to pydicom", pos);
    if (h.length == kUndefinedLength) return fail(ScanStatus::kWrongVR, "a wanted element has an undefined length", pos);
    if (!implicit_for(h)) {
      const bool ok = w.kind == WantedKind::kPixelData
                          ? (h.vr[0] == 'O' && (h.vr[1] == 'B' || h.vr[1] == 'W'))
                          : (h.vr[0] == static_cast<uint8_t>(w.vr[0]) && h.vr[1] == static_cast<uint8_t>(w.vr[1]));
      if (!ok) return fail(ScanStatus::kWrongVR, "a wanted element has another VR", pos);
    }
    FoundElement e;
    e.index = static_cast<uint32_t>(next_wanted_);
    e.offset = h.value;
    e.length = h.length;
    result_.found.push_back(e);
    ++next_wanted_;
    return true;
  }

  // File Meta elements are always explicit VR; data set elements follow the transfer syntax.
  bool implicit_for(const Header& h) const { return (h.tag >> 16) != 0x0002u && implicit_; }

  // Reads an element header at `pos` (limit: the end of the enclosing item or the buffer).
  // Explicit VR: the VR must be a standard one; the 32-bit length form for OB, SQ, UN...
  bool read_header(std::size_t pos, std::size_t limit, bool implicit, Header& h) {
    if (limit < pos || limit - pos < 8) return fail(ScanStatus::kTruncated, "element header past the end", pos);
    const uint8_t* p = data_ + pos;
    h.tag = (static_cast<uint32_t>(le16(p)) << 16) | le16(p + 2);
    if ((h.tag >> 16) == 0xFFFEu) {  // item / delimiters: tag + 32-bit length, whatever the VR mode
      h.vr[0] = h.vr[1] = 0;
      h.length = le32(p + 4);
      h.value = pos + 8;
      return true;
    }
    if (implicit) {
      h.vr[0] = h.vr[1] = 0;
      h.length = le32(p + 4);
      h.value = pos + 8;
      return true;
    }
    h.vr[0] = p[4];
    h.vr[1] = p[5];
    if (!known_vr(h.vr[0], h.vr[1])) return fail(ScanStatus::kUnknownVR, "explicit VR is not a standard VR", pos);
    if (long_length_vr(h.vr[0], h.vr[1])) {
      if (limit - pos < 12) return fail(ScanStatus::kTruncated, "element header past the end", pos);
      h.length = le32(p + 8);
      h.value = pos + 12;
    } else {
      h.length = le16(p + 6);
      h.value = pos + 8;
    }
    return true;
  }

  // The value of `h` must lie inside [h.value, limit).
  bool check_value(const Header& h, std::size_t limit) {
    if (limit < h.value || h.length > limit - h.value)
      return fail(ScanStatus::kTruncated, "element value runs past the end", h.value);
    return true;
  }

  bool scan() {
    if (size_ < 132 || std::memcmp(data_ + 128, "DICM", 4) != 0)
      return fail(ScanStatus::kNoPreamble, "no 'DICM' prefix at byte 128", 0);
    std::size_t pos = 132;
    if (!scan_file_meta(pos)) return false;
    return scan_dataset(pos);
  }

  // File Meta Information: Explicit VR Little Endian elements of group 0002, increasing,
  // defined lengths; its Transfer Syntax UID must be one of the two native little-endian ones.
  bool scan_file_meta(std::size_t& pos) {
    bool first = true;
    uint32_t previous = 0;
    const uint8_t* syntax = nullptr;
    std::size_t syntax_length = 0;
    while (true) {
      if (remaining(pos) < 8) return fail(ScanStatus::kFileMeta, "the data ends inside the File Meta Information", pos);
      if (le16(data_ + pos) != 0x0002u) break;
      Header h;
      if (!read_header(pos, size_, false, h)) {
        result_.status = ScanStatus::kFileMeta;
        return false;
      }
      if (h.length == kUndefinedLength) return fail(ScanStatus::kFileMeta, "undefined length in the File Meta", pos);
      if (!check_value(h, size_)) return false;
      if (!first && h.tag <= previous) return fail(ScanStatus::kFileMeta, "File Meta tags not increasing", pos);
      // pydicom converts the first element and the Group Length while reading: keep both to
      // forms whose conversion cannot fail.
      const bool group_length = h.tag == 0x00020000u;
      if (group_length && !(h.vr[0] == 'U' && h.vr[1] == 'L' && h.length == 4))
        return fail(ScanStatus::kFileMeta, "File Meta Group Length is not one UL", pos);
      if (first && !group_length && !(h.tag == 0x00020001u && h.vr[0] == 'O' && h.vr[1] == 'B'))
        return fail(ScanStatus::kFileMeta, "File Meta does not start with its Group Length or Version", pos);
      if (h.tag == 0x00020010u) {
        if (!(h.vr[0] == 'U' && h.vr[1] == 'I'))
          return fail(ScanStatus::kFileMeta, "Transfer Syntax UID is not VR UI", pos);
        syntax = data_ + h.value;
        syntax_length = h.length;
      }
      if (!offer(h, pos)) return false;
      previous = h.tag;
      first = false;
      pos = h.value + h.length;
    }
    if (first) return fail(ScanStatus::kFileMeta, "no File Meta Information elements", pos);
    if (syntax == nullptr) return fail(ScanStatus::kTransferSyntax, "no Transfer Syntax UID", pos);
    // pydicom strips trailing NULs and spaces before comparing (convert_UI).
    while (syntax_length > 0 && (syntax[syntax_length - 1] == 0 || syntax[syntax_length - 1] == ' ')) --syntax_length;
    auto equals = [&](const char* uid) {
      const std::size_t n = std::strlen(uid);
      return syntax_length == n && std::memcmp(syntax, uid, n) == 0;
    };
    if (equals(kExplicitVRLittleEndian)) {
      implicit_ = false;
    } else if (equals(kImplicitVRLittleEndian)) {
      implicit_ = true;
    } else {
      return fail(ScanStatus::kTransferSyntax, "not a native little-endian transfer syntax", pos);
    }
    result_.implicit_vr = implicit_;
    return true;
  }

  bool scan_dataset(std::size_t pos) {
    if (remaining(pos) < 8) return fail(ScanStatus::kStructure, "empty data set", pos);
    const uint16_t first_group = le16(data_ + pos);
    if (first_group <= 0x0002u) return fail(ScanStatus::kStructure, "command or meta group in the data set", pos);
    // pydicom looks at the first element's VR bytes and switches encoding when they
    // disagree with the transfer syntax; only the agreeing case is accepted here.
    if (implicit_ && data_[pos + 4] > 0x40 && data_[pos + 4] < 0x5B && data_[pos + 5] > 0x40 && data_[pos + 5] < 0x5B)
      return fail(ScanStatus::kStructure, "implicit VR data set that looks explicit", pos);
    bool first = true;
    uint32_t previous = 0;
    while (pos != size_) {
      if (remaining(pos) < 8) return fail(ScanStatus::kTruncated, "trailing bytes after the last element", pos);
      Header h;
      if (!read_header(pos, size_, implicit_, h)) return false;
      if ((h.tag >> 16) == 0xFFFEu) return fail(ScanStatus::kStructure, "item or delimiter at the top level", pos);
      if (!first && h.tag <= previous) return fail(ScanStatus::kOrder, "top-level tags not increasing", pos);
      if ((h.tag >> 16) <= 0x0002u) return fail(ScanStatus::kStructure, "command or meta group in the data set", pos);
      first = false;
      previous = h.tag;
      if (h.length == kUndefinedLength) {
        if ((h.tag >> 16) == 0x7FE0u) return fail(ScanStatus::kEncapsulated, "undefined-length pixel data", pos);
        if (!offer(h, pos)) return false;  // a wanted one is refused (undefined length)
        if (!undefined_sequence(h, size_, 1, pos)) return false;
        continue;
      }
      if (!check_value(h, size_)) return false;
      if (!offer(h, pos)) return false;
      pos = h.value + h.length;
    }
    return true;
  }

  // An undefined-length element `h` read as a sequence; `pos` ends after its delimiter.
  bool undefined_sequence(const Header& h, std::size_t limit, int depth, std::size_t& pos) {
    if (depth > kMaxSequenceDepth) return fail(ScanStatus::kTooDeep, "sequences nested too deeply", h.value);
    if (implicit_) {
      if (result_.undefined.size() >= kMaxUndefined)
        return fail(ScanStatus::kTooMany, "too many undefined-length elements", h.value);
      UndefinedLength u;
      u.tag = h.tag;
      u.starts_with_item = limit >= h.value && limit - h.value >= 4 && le16(data_ + h.value) == 0xFFFEu &&
                           le16(data_ + h.value + 2) == 0xE000u;
      result_.undefined.push_back(u);
    } else if (!is_sq(h.vr)) {
      // Explicit VR: only SQ. pydicom reads UN as an implicit-VR sequence and other VRs up to
      // the first delimiter bytes, neither of which this scanner reproduces.
      return fail(ScanStatus::kStructure, "undefined length on an explicit VR other than SQ", h.value);
    }
    std::size_t p = h.value;
    while (true) {
      Header item;
      if (!read_header(p, limit, true, item)) return false;
      if (item.tag == kSequenceDelimiter) {
        if (item.length != 0) return fail(ScanStatus::kStructure, "sequence delimiter with a length", p);
        pos = item.value;
        return true;
      }
      if (item.tag != kItem) return fail(ScanStatus::kStructure, "sequence content that is not an item", p);
      if (item.length == kUndefinedLength) {
        if (!item_dataset(item.value, limit, false, depth, p)) return false;
      } else {
        if (!check_value(item, limit)) return false;
        const std::size_t end = item.value + item.length;
        std::size_t q = 0;
        if (!item_dataset(item.value, end, true, depth, q)) return false;
        p = end;
      }
    }
  }

  // The data set of one item: up to `limit` exactly (defined length), or up to its Item
  // Delimitation Item (undefined length). `pos` ends after the item.
  bool item_dataset(std::size_t start, std::size_t limit, bool defined, int depth, std::size_t& pos) {
    std::size_t p = start;
    while (true) {
      if (defined && p == limit) {
        pos = p;
        return true;
      }
      Header h;
      if (!read_header(p, limit, implicit_, h)) return false;
      if (h.tag == kItemDelimiter) {
        if (defined) return fail(ScanStatus::kStructure, "item delimiter in a defined-length item", p);
        if (h.length != 0) return fail(ScanStatus::kStructure, "item delimiter with a length", p);
        pos = h.value;
        return true;
      }
      if ((h.tag >> 16) == 0xFFFEu) return fail(ScanStatus::kStructure, "item or delimiter inside an item", p);
      // pydicom converts a nested Specific Character Set while reading; not reproduced here.
      if (h.tag == kSpecificCharacterSet)
        return fail(ScanStatus::kStructure, "Specific Character Set inside a sequence item", p);
      if (h.length == kUndefinedLength) {
        if ((h.tag >> 16) == 0x7FE0u) return fail(ScanStatus::kEncapsulated, "undefined-length pixel data", p);
        if (!undefined_sequence(h, limit, depth + 1, p)) return false;
        continue;
      }
      if (!check_value(h, limit)) return false;
      p = h.value + h.length;
    }
  }
};

}  // namespace

ScanResult scan_dicom(const uint8_t* data, std::size_t size, const WantedElement* wanted, std::size_t wanted_count) {
  ScanResult result;
  if (data == nullptr) {
    result.status = ScanStatus::kNoPreamble;
    result.reason = "no data";
    return result;
  }
  Scanner scanner(data, size, result);
  if (!scanner.run(wanted, wanted_count)) {
    result.found.clear();
    result.undefined.clear();
  }
  return result;
}

}  // namespace medge
