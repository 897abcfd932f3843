/* Optional compiled helpers for qedkit's hot loops.
 *
 * Built at install time when a C compiler and Python's headers are there
 * (setup.py marks the extension optional); every caller keeps a pure-Python
 * path that gives the same answers, and the tests hold the two to each other.
 *
 * mark_clusters(table, used, cluster_bits) -> (allocated, fragmented) or None
 *
 *   The quick scan's inner loop over one L2 table (engine/check.py,
 *   _quick_scan): ``table`` holds the table's bytes as on disk (little-endian
 *   64-bit entries), ``used`` is the check's bitmap, one byte per cluster of
 *   the file. Each entry other than 0 (unallocated) and 1 (zero cluster) marks
 *   its cluster in ``used``. Returns the number of such entries and how many of
 *   them do not follow the previous one of the table by one cluster (QEMU's
 *   fragmentation count), or None at the first entry that is not
 *   cluster-aligned, lies past the bitmap or marks a cluster already marked;
 *   ``used`` may then be partly marked (the caller starts an exact scan over).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static inline uint64_t
load_le64(const unsigned char *p)
{
    return (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 |
           (uint64_t)p[3] << 24 | (uint64_t)p[4] << 32 | (uint64_t)p[5] << 40 |
           (uint64_t)p[6] << 48 | (uint64_t)p[7] << 56;
}

static PyObject *
mark_clusters(PyObject *module, PyObject *args)
{
    Py_buffer table, used;
    int bits;
    PyObject *result = NULL;

    if (!PyArg_ParseTuple(args, "y*w*i:mark_clusters", &table, &used, &bits))
        return NULL;
    if (bits < 9 || bits > 40) {
        PyErr_Format(PyExc_ValueError, "mark_clusters: cluster_bits %d out of range", bits);
        goto done;
    }
    if (table.len % 8) {
        PyErr_Format(PyExc_ValueError,
                     "mark_clusters: table of %zd bytes is not whole 8-byte entries", table.len);
        goto done;
    }
    {
        const unsigned char *p = table.buf, *end = p + table.len;
        unsigned char *marks = used.buf;
        const uint64_t size = 1ULL << bits, low = size - 1, clusters = (uint64_t)used.len;
        uint64_t last = 0, allocated = 0, fragmented = 0;
        int ok = 1;

        for (; p < end; p += 8) {
            uint64_t entry = load_le64(p), cluster;
            if (entry <= 1)
                continue;
            cluster = entry >> bits;
            if ((entry & low) || cluster >= clusters || marks[cluster]) {
                ok = 0;
                break;
            }
            marks[cluster] = 1;
            allocated++;
            if (last && last + size != entry)
                fragmented++;
            last = entry;
        }
        if (ok)
            result = Py_BuildValue("KK", (unsigned long long)allocated,
                                   (unsigned long long)fragmented);
        else
            result = Py_NewRef(Py_None);
    }
done:
    PyBuffer_Release(&table);
    PyBuffer_Release(&used);
    return result;
}

static PyMethodDef methods[] = {
    {"mark_clusters", mark_clusters, METH_VARARGS,
     "mark_clusters(table, used, cluster_bits) -> (allocated, fragmented) or None\n\n"
     "Mark the data clusters of one L2 table's bytes in the bitmap `used`;\n"
     "None at an entry that is misaligned, past the bitmap or already marked."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "qedkit._speedups",
    "Optional compiled helpers (each has a pure-Python twin).", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
